"""transformers' own common model tests (ModelTesterMixin, ConfigTester, TrainingTesterMixin), run against the
selfattn classes.

The mixins are not copied here: `sdist.py` downloads the source distribution of the installed transformers
version when the tests run, keeps its `tests/` folder in a git-ignored cache and imports it under another
package name (`hf_transformers_tests`), so that it never meets this repository's own `tests/` folder. The three
modules that folder imports but the sdist lacks are replaced by the `standin_*.py` files here.
"""
