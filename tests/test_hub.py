"""push_to_hub end to end against a stand-in for the Hub's HTTP API: what would be uploaded is recorded to a
folder, checked (weights, config with auto_map, code, model card) and loaded as remote code in a fresh process
without the selfattn package."""

import json
import logging
import shutil
import sys
import types
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, RepoUrl
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import load_file

from conftest import make_tiny_config
from integration_helpers import assert_same_outputs, load_without_package, model_outputs
import modeling_selfattn.model
from modeling_selfattn import SelfAttnForCausalLM, SelfAttnForSequenceClassification
from modeling_selfattn.config import AUTO_MAP
from modeling_selfattn.hub import GENERATED_MARKER, render_model_card

CODE_FILES = {"config.py", "model.py", "input_checks.py", "packing.py", "hub.py", "heads.py"}


class StandInHub:
    """Answers the Hub calls that push_to_hub makes and keeps each repository's files under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.created_repos: list[str] = []
        self.commits: list[dict] = []

    def repo_folder(self, repo_id: str) -> Path:
        return self.root / repo_id

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
        if self.repo_folder(repo_id).exists() and not exist_ok:
            raise AssertionError(f"{repo_id} exists and exist_ok=False")
        self.repo_folder(repo_id).mkdir(parents=True, exist_ok=True)
        self.created_repos.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        assert repo_id in self.created_repos, f"commit to {repo_id} before create_repo"
        paths = []
        for operation in operations:
            assert isinstance(operation, CommitOperationAdd), operation
            destination = self.repo_folder(repo_id) / operation.path_in_repo
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(operation.path_or_fileobj, destination)
            paths.append(operation.path_in_repo)
        self.commits.append({"repo_id": repo_id, "paths": sorted(paths), "message": commit_message})
        return f"https://huggingface.co/{repo_id}/commit/{len(self.commits)}"

    def hf_hub_download(self, repo_id, filename, **kwargs):
        # ModelCard.load reads the repository's current README.md through this.
        path = self.repo_folder(repo_id) / filename
        if not path.exists():
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        return str(path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    stand_in = StandInHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, *args, **kwargs: stand_in.create_repo(*args, **kwargs))
    monkeypatch.setattr(HfApi, "create_commit", lambda api, *args, **kwargs: stand_in.create_commit(*args, **kwargs))
    monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", stand_in.hf_hub_download)
    # Any call the stand-in does not answer fails instead of reaching the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return stand_in


def labelled_classifier():
    torch.manual_seed(0)
    labels = {"id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}
    config = make_tiny_config("encoder", **labels)
    return SelfAttnForSequenceClassification(config)


def classifier_inputs():
    return {"input_ids": torch.randint(3, 99, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}


def test_push_to_hub_uploads_weights_config_code_and_card(hub, tmp_path):
    classifier = labelled_classifier()
    classifier.push_to_hub("someone/selfattn-sentiment", tags=["sentiment"])
    torch.manual_seed(1)
    causal_lm = SelfAttnForCausalLM(make_tiny_config("decoder"))
    causal_lm.push_to_hub("someone/selfattn-lm")

    assert hub.created_repos == ["someone/selfattn-sentiment", "someone/selfattn-lm"]
    assert [commit["repo_id"] for commit in hub.commits] == hub.created_repos
    uploaded = set(hub.commits[0]["paths"])
    assert {"config.json", "model.safetensors", "README.md"} | CODE_FILES <= uploaded, uploaded
    assert not any(path.endswith((".bin", ".pt")) for path in uploaded), uploaded
    assert "generation_config.json" in hub.commits[1]["paths"]

    folder = hub.repo_folder("someone/selfattn-sentiment")
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert config["architectures"] == ["SelfAttnForSequenceClassification"]
    weights = load_file(folder / "model.safetensors")
    for name, tensor in classifier.state_dict().items():
        assert torch.equal(weights[name], tensor), name

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-classification"
    assert {"selfattn", "sentiment"} <= set(card.data.tags)
    text = card.text
    assert GENERATED_MARKER in text
    assert f"{classifier.num_parameters():,}" in text
    config = classifier.config
    assert f"hidden size {config.hidden_size}, {config.num_attention_heads} attention heads" in text
    assert 'from_pretrained("someone/selfattn-sentiment", trust_remote_code=True)' in text
    assert "from transformers import AutoModelForSequenceClassification" in text
    assert "negative, positive" in text
    assert "## Intended use" in text and "## Limits" in text
    assert "text-generation" == ModelCard.load(hub.repo_folder("someone/selfattn-lm") / "README.md").data.pipeline_tag

    inputs = classifier_inputs()
    cases = {
        "classifier": {
            "auto_class": "AutoModelForSequenceClassification",
            "folder": folder,
            "inputs": inputs,
            "expected": model_outputs(classifier, inputs),
        },
        "causal_lm": {
            "auto_class": "AutoModelForCausalLM",
            "folder": hub.repo_folder("someone/selfattn-lm"),
            "inputs": inputs,
            "generate": True,
            "expected": model_outputs(causal_lm, inputs, generate=True),
        },
    }
    work_dir = tmp_path / "fresh"
    work_dir.mkdir()
    loaded = load_without_package(cases, work_dir)
    for name, case in cases.items():
        assert loaded[name]["module"].startswith("transformers_modules."), loaded[name]["module"]
        assert_same_outputs(case["expected"], loaded[name]["outputs"], name)


HUB_METADATA = {
    "license": "apache-2.0",
    "datasets": ["glue"],
    "language": ["en"],
    "base_model": "someone/selfattn-base",
    "model-index": [
        {
            "name": "selfattn-sentiment",
            "results": [
                {
                    "task": {"type": "text-classification"},
                    "dataset": {"name": "SST-2", "type": "glue"},
                    "metrics": [{"type": "accuracy", "value": 0.921}],
                }
            ],
        }
    ],
}


def test_a_second_push_refreshes_the_card_text_and_keeps_the_hubs_metadata(hub):
    # Metadata added on the Hub (its metadata editor, or a card saved with huggingface_hub) is the owner's: license,
    # datasets, base_model, evaluation results. Only the text below it is ours to refresh, and what the model decides.
    model = labelled_classifier()
    model.push_to_hub("someone/selfattn-sentiment", tags=["sentiment"])
    readme = hub.repo_folder("someone/selfattn-sentiment") / "README.md"
    card = ModelCard.load(readme)
    for key, value in HUB_METADATA.items():
        card.data[key] = value
    card.data.tags.append("added-on-the-hub")
    card.data.pipeline_tag = "not-ours-to-keep"
    card.save(readme)

    model.config.id2label = {0: "bad", 1: "good"}
    model.push_to_hub("someone/selfattn-sentiment", tags=["second-push"])
    card = ModelCard.load(readme)
    metadata = card.data.to_dict()
    assert {key: metadata.get(key) for key in HUB_METADATA} == HUB_METADATA
    assert card.data.tags == ["selfattn", "custom_code", "sentiment", "added-on-the-hub", "second-push"]
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-classification")
    assert GENERATED_MARKER in card.text and "bad, good" in card.text and "negative, positive" not in card.text


def test_a_push_keeps_a_card_whose_text_was_edited_on_the_hub(hub, caplog):
    model = labelled_classifier()
    model.push_to_hub("someone/selfattn-sentiment")
    readme = hub.repo_folder("someone/selfattn-sentiment") / "README.md"
    card = ModelCard.load(readme)
    card.data.license = "mit"
    card.text = card.text.replace("## Limits", "## Training\n\nFine-tuned on SST-2: 92.1% accuracy.\n\n## Limits")
    card.save(readme)
    hand_written = hub.repo_folder("someone/hand-written") / "README.md"
    hand_written.parent.mkdir(parents=True)
    hand_written.write_text("---\nlicense: mit\n---\n# My model\n\nTrained by me.\n")

    model.config.id2label = {0: "bad", 1: "good"}
    with caplog.at_level(logging.WARNING):
        model.push_to_hub("someone/selfattn-sentiment", tags=["second-push"])
        model.push_to_hub("someone/hand-written")
    card = ModelCard.load(readme)
    assert "Fine-tuned on SST-2" in card.text and "negative, positive" in card.text and "bad, good" not in card.text
    assert card.data.license == "mit" and {"selfattn", "second-push"} <= set(card.data.tags)
    card = ModelCard.load(hand_written)
    assert card.text == "# My model\n\nTrained by me.\n" and card.data.license == "mit"
    assert set(card.data.tags) == {"selfattn", "custom_code"}
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-classification")
    warnings = [record.getMessage() for record in caplog.records if record.name == "modeling_selfattn.hub"]
    assert len(warnings) == 2 and all("kept as it is" in warning for warning in warnings), warnings


def test_save_pretrained_with_push_to_hub_uploads_the_generated_card(hub, tmp_path):
    labelled_classifier().save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/pushed-on-save")
    card = (hub.repo_folder("someone/pushed-on-save") / "README.md").read_text()
    assert GENERATED_MARKER in card and "someone/pushed-on-save" in card
    assert CODE_FILES <= set(hub.commits[0]["paths"])


def test_save_pretrained_refreshes_its_card_but_keeps_a_hand_written_one(tmp_path):
    model = labelled_classifier()
    model.save_pretrained(tmp_path / "generated")
    model.config.id2label = {0: "bad", 1: "good"}
    model.save_pretrained(tmp_path / "generated")
    card = (tmp_path / "generated" / "README.md").read_text()
    assert GENERATED_MARKER in card and "bad, good" in card

    (tmp_path / "hand").mkdir()
    (tmp_path / "hand" / "README.md").write_text("# My model\n")
    model.save_pretrained(tmp_path / "hand")
    assert (tmp_path / "hand" / "README.md").read_text() == "# My model\n"


def test_save_pretrained_keeps_its_card_once_edited_and_the_metadata_added_to_it(tmp_path, caplog):
    # The card asks its owner to add the training data and the evaluation: once they do, it is theirs.
    model = labelled_classifier()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    readme = folder / "README.md"
    edited = readme.read_text().replace("## Limits", "## Training\n\nFine-tuned on SST-2.\n\n## Limits")
    readme.write_text(edited)
    model.config.id2label = {0: "bad", 1: "good"}
    with caplog.at_level(logging.WARNING):
        model.save_pretrained(folder)
    assert readme.read_text() == edited
    assert any("has been edited since" in record.getMessage() for record in caplog.records)

    # Metadata alone added (a license): kept, and the text below it still follows the config.
    model.save_pretrained(tmp_path / "licensed")
    readme = tmp_path / "licensed" / "README.md"
    card = ModelCard.load(readme)
    card.data.license = "apache-2.0"
    card.save(readme)
    model.config.id2label = {0: "awful", 1: "great"}
    model.save_pretrained(tmp_path / "licensed")
    card = ModelCard.load(readme)
    assert card.data.license == "apache-2.0" and "awful, great" in card.text

    # A card of an earlier release, marked without a hash: whether it was edited cannot be told, so it stays.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    text = "---\nlibrary_name: transformers\n---\n" + GENERATED_MARKER + " -->\n\n# My model\n"
    (legacy / "README.md").write_text(text)
    model.save_pretrained(legacy)
    assert (legacy / "README.md").read_text() == text


def test_the_card_of_a_pruned_model_counts_the_heads_removed(tmp_path):
    model = SelfAttnForSequenceClassification(make_tiny_config("encoder"))
    heads = model.config.num_attention_heads
    model.save_pretrained(tmp_path / "whole")
    assert f"{heads} attention heads of size" in (tmp_path / "whole" / "README.md").read_text()
    model.prune_heads({0: [0, 1], 1: [0]})
    model.save_pretrained(tmp_path / "pruned")
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert "3 of them removed (`config.pruned_heads`)" in card


def test_save_pretrained_writes_its_code_over_no_one_s_own_files(tmp_path):
    model = labelled_classifier()
    own = {"model.py": "# my training script\n", "config.py": "BATCH = 8\n"}
    project = tmp_path / "project"
    project.mkdir()
    for name, text in own.items():
        (project / name).write_text(text)
    with pytest.raises(FileExistsError, match=r"save_directory=.*project.* holds config\.py, model\.py.*another folder"):
        model.save_pretrained(project)
    with pytest.raises(FileExistsError, match=r"holds config\.py"):
        model.config.save_pretrained(project)
    # refused before anything was written
    assert {path.name: path.read_text() for path in project.iterdir()} == own

    # A selfattn save of its own is refreshed, its older code included; identical files are no clash either.
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    (saved / "model.py").write_text("# the code of an older release\n")
    model.save_pretrained(saved)
    assert (saved / "model.py").read_bytes() == Path(modeling_selfattn.model.__file__).read_bytes()
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy, ignore=shutil.ignore_patterns("config.json"))
    model.save_pretrained(copy)
    assert (copy / "config.json").is_file()


def test_a_class_defined_in_main_saves_beside_files_of_the_same_names(tmp_path, monkeypatch):
    # transformers copies no code for a class of __main__, so nothing of the folder is at stake; a notebook's or the
    # REPL's __main__ has no file at all.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    notebook_class = type("NotebookClassifier", (SelfAttnForSequenceClassification,), {"__module__": "__main__"})
    model = notebook_class(labelled_classifier().config)
    (tmp_path / "model.py").write_text("# my training script\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.py").read_text() == "# my training script\n"
    assert (tmp_path / "config.json").is_file()


def test_a_converted_card_keeps_the_source_card():
    from modeling_selfattn.hub import card_with_source

    ours = render_model_card(SelfAttnForSequenceClassification(make_tiny_config("encoder")), "converted")
    source = (
        "---\nlicense: mit\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\ntags: [mine]\n---\n"
        "My text.\n"
    )
    card = ModelCard(card_with_source(ours, source, "org/source", "org/source"))
    assert card.data.license == "mit" and card.data.base_model == "org/source"
    assert card.data.tags == ["selfattn", "custom_code", "mine"]
    # The converted folder does not carry the sentence-transformers modules: the card says what it does serve.
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-classification")
    assert card.text.rstrip().endswith("My text.") and "`org/source`" in card.text
    kept = ModelCard(card_with_source(ours, source, "org/source", served_libraries=("sentence-transformers",)))
    assert (kept.data.library_name, kept.data.pipeline_tag) == ("sentence-transformers", "sentence-similarity")
    assert kept.data.base_model is None
    # Metadata that cannot be read is no reason to lose the card: it is kept whole, as text.
    broken = "---\nlicense: [mit\n---\nMy text.\n"
    assert broken.strip() in ModelCard(card_with_source(ours, broken, "source")).text


def test_an_exported_card_keeps_the_owner_s_text_and_metadata_without_our_tags(tmp_path):
    from modeling_selfattn.hub import exported_card

    model = SelfAttnForSequenceClassification(make_tiny_config("encoder"))
    generated = render_model_card(model, "model")
    card = ModelCard(exported_card(generated, "## Export\n\nExported.", "text-classification"))
    assert card.data.tags is None and card.data.library_name == "transformers"
    assert card.text.strip() == "## Export\n\nExported."  # generated text only: nothing of the owner's to keep
    owned = ModelCard(generated)
    owned.data.license = "mit"
    owned.text = "Mine."
    card = ModelCard(exported_card(str(owned), "## Export\n\nExported.", "text-classification"))
    assert card.data.license == "mit" and card.text.rstrip().endswith("Mine.")
