"""What the argument checks of several modules share: which values count as integers, and how a refusal lists
names. It imports nothing of the package, so that files shipped with saved models (quantization.py) and
package-only ones (pipelines.py, output_folder.py, ...) can all use it."""

import numbers


def is_integer(value) -> bool:
    """Any integer type, numpy's too, but bool: True given as a count or an index is a mistake, not 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def shown(names: list[str], limit: int = 10) -> str:
    """`names` for a message: the first `limit` of them, and how many more there are."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
