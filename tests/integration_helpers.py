"""Helpers shared by the integration tests: loading saved folders in a fresh Python process that cannot import
the selfattn package, as a user of a Hub checkpoint without the package would, and comparing outputs; CTranslate2,
skipped where it is not installed, and the token lists it takes."""

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_config

# Put before each script run_without_package runs: reads the job, puts only the interpreter's site-packages on
# sys.path, and defines report(**values), which prints the one line the parent reads, with where (if anywhere) the
# selfattn package could be imported from.
CHILD_PREAMBLE = r"""
import importlib.util, json, sys
job = json.loads(sys.argv[1])
sys.path.extend(job["site_packages"])
_spec = importlib.util.find_spec("modeling_selfattn")

def report(**values):
    print("RESULT " + json.dumps({"package_found_at": _spec.origin if _spec else None, **values}))
"""


def run_without_package(script: str, job: dict, work_dir: Path) -> dict:
    """Run `script` (after CHILD_PREAMBLE, with `job` as JSON in sys.argv[1]) with `python -I -S`: no PYTHONPATH,
    no current directory, no .pth files (so no editable install), only the interpreter's site-packages, no HF_ or
    TRANSFORMERS_ variables and the Hub offline; a user of a saved folder without the selfattn package. Asserts that
    the process succeeded and could not import the package; returns what the script report()ed."""
    job = {"site_packages": site.getsitepackages(), **job}
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(work_dir / "hf_home"))
    completed = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHILD_PREAMBLE + script, json.dumps(job)],
        cwd=work_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, f"the fresh process failed:\n{completed.stderr[-4000:]}"
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["package_found_at"] is None, (
        f"the fresh process could import modeling_selfattn from {result['package_found_at']}, so it does not test "
        "remote code; install the package in editable mode (pip install -e .) rather than into site-packages."
    )
    return result


# Loads each case through its Auto class with trust_remote_code=True and saves the outputs for the parent to compare.
LOAD_CASES_SCRIPT = r"""
import torch, transformers
cases = {}
for name, case in job["cases"].items():
    model = getattr(transformers, case["auto_class"]).from_pretrained(case["folder"], trust_remote_code=True)
    inputs = torch.load(case["inputs"])
    with torch.no_grad():
        outputs = {key: value for key, value in model(**inputs).items() if torch.is_tensor(value)}
        if case["generate"]:
            outputs["generated"] = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    cases[name] = {"module": type(model).__module__, "training": model.training}
    torch.save(outputs, case["outputs"])
report(cases=cases)
"""


def model_outputs(model, inputs: dict, generate: bool = False) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        outputs = {key: value for key, value in model(**inputs).items() if torch.is_tensor(value)}
        if generate:
            outputs["generated"] = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return outputs


def load_without_package(cases: dict[str, dict], work_dir: Path) -> dict[str, dict]:
    """cases: name -> {"auto_class", "folder", "inputs" (dict of tensors), "generate" (bool)}.

    Returns name -> {"module": module of the loaded class, "training": its training flag, "outputs": tensors}.
    """
    job_cases = {}
    for name, case in cases.items():
        inputs_file = work_dir / f"{name}.inputs.pt"
        torch.save(case["inputs"], inputs_file)
        job_cases[name] = {
            "auto_class": case["auto_class"],
            "folder": str(case["folder"]),
            "inputs": str(inputs_file),
            "outputs": str(work_dir / f"{name}.outputs.pt"),
            "generate": case.get("generate", False),
        }
    results = run_without_package(LOAD_CASES_SCRIPT, {"cases": job_cases}, work_dir)
    for name, case in results["cases"].items():
        case["outputs"] = torch.load(job_cases[name]["outputs"])
    return results["cases"]


def assert_same_outputs(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], label: str) -> None:
    """fp32 on the same machine: max abs diff <= 1e-5 (generated ids exactly)."""
    assert sorted(expected) == sorted(actual), f"{label}: outputs {sorted(actual)}, expected {sorted(expected)}"
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=lambda m: f"{label}.{key}: {m}")


# Tiny configs and inputs of the three shapes, shared by the tests that run every head (remote code, quantization).


def encoder_config():
    return make_tiny_config("encoder", num_labels=3)


def seq2seq_config():
    # The paper's choices, so that the sinusoidal table and the embedding scale travel too.
    return make_tiny_config(
        "encoder_decoder",
        hidden_act="relu",
        position_embedding_type="sinusoidal",
        scale_embedding=True,
        embedding_layer_norm=False,
        type_vocab_size=0,
    )


def causal_config():
    return make_tiny_config("decoder", pre_layer_norm=True, type_vocab_size=0)


def encoder_inputs():
    input_ids = torch.randint(3, 99, (2, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def seq2seq_inputs():
    # generate() continues the given decoder prefix.
    return {**encoder_inputs(), "decoder_input_ids": torch.randint(3, 99, (2, 4))}


def ctranslate2():
    return pytest.importorskip("ctranslate2")


def real_tokens(tokenizer, batch) -> list[list[str]]:
    """Each sequence of a padded batch as its tokens without the padding: CTranslate2's input."""
    return [
        tokenizer.convert_ids_to_tokens([token for token, keep in zip(ids, mask) if keep])
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())
    ]
