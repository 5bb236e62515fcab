"""All doctor checks. Each is `check(folder: ModelFolder) -> Iterator[Finding]`; a check that crashes becomes an
"internal" finding instead of stopping the others."""
from . import config, family, shapes, tokenizer, tokens, weights

ALL_CHECKS = config.CHECKS + family.CHECKS + shapes.CHECKS + weights.CHECKS + tokens.CHECKS + tokenizer.CHECKS

__all__ = ["ALL_CHECKS"]
