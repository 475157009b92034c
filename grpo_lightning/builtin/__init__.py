"""Built-ins: the answer format, the GSM8K rewards, the arithmetic task, the tiny model and the SFT warm-up."""

BUILTIN_PREFIX = "builtin:"  # what the package ships, by name: builtin:tiny-arithmetic, builtin:gsm8k-sample


def is_path(source: str) -> bool:
    """Whether a model or data source is written as a filesystem path (which must then exist), not a hub id."""
    return source.startswith((".", "/", "~"))
