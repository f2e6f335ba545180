"""JAX's persistent compilation cache (the top-level ``compilation`` section): a restarted job reuses its programs."""

from __future__ import annotations

from pathlib import Path

import pydantic

from workshop_dist.config import StrictConfig


class CompilationConfiguration(StrictConfig):
    """Process-wide compilation settings (``compilation:``), applied once by ``workshop-train``."""

    cache_dir: str | None = pydantic.Field(
        "~/.cache/workshop_dist/jax_compilation_cache",
        description="JAX's persistent compilation cache (a restarted job skips recompiling); null: off.",
    )


def enable_cache(config: CompilationConfiguration) -> None:
    """Turn on the persistent cache in ``config.cache_dir``; a directory already given to JAX
    (``JAX_COMPILATION_CACHE_DIR``) wins."""
    import jax

    if config.cache_dir is None or jax.config.jax_compilation_cache_dir:
        return
    path = Path(config.cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)  # skip trivial programs
