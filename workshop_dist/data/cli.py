"""``workshop-data``: prepare and look at data sets for ``workshop-train``.

    workshop-data convert SRC DEST [--shards N] [--workers P] [--image-size S] [--channels 1|3]
    workshop-data inspect PATH [--grid OUT.png]
    workshop-data stats PATH --out REF.npz --weights INCEPTION.safetensors
    workshop-data convert-weights inception PTH OUT.safetensors
    workshop-data convert-weights sd-vae VAE.safetensors OUT.safetensors
    workshop-data encode --autoencoder RUN_OR_WEIGHTS SRC DEST [--store moments|sample] [--shards N]

``SRC``/``PATH``: an image folder (one folder per split), ``.npz``/``.npy`` arrays,
``tfds:NAME[:CONFIG]`` prepared in ``--data-dir``, or ArrayRecord files
(:mod:`workshop_dist.data.splits`); ``encode`` also takes ``digits`` (the built-in data, with
``--image-size``). Exit codes as ``workshop-train``: 0 done, 1 unreadable
data, 2 bad input or usage; 130 interrupted (``convert`` and ``encode`` then resume when run again).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

# Where `stats` and `convert-weights` find their implementation (the Inception port), as
# "module:function", imported only when the command runs (a test may point them elsewhere):
#   stats(split_source: SplitSource, out_npz: Path, inception_weights: Path) -> None
#       split_source: len() and [i] -> {"image": uint8 (H, W, C), ...} (workshop_dist.data.splits)
#   convert_weights(network: str, source: Path, out: Path) -> None
HOOKS = {
    "stats": "workshop_dist.eval.stats:reference_statistics",
    "convert-weights": "workshop_dist.eval.stats:convert_weights",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workshop-data", description=__doc__.split("\n\n")[0])
    _flags(parser, default=False)
    common = argparse.ArgumentParser(add_help=False)  # the same flags after the command name
    _flags(common, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = lambda name, **kwargs: commands.add_parser(name, parents=[common], **kwargs)  # noqa: E731

    convert = add("convert", help="SRC into sharded ArrayRecord files in DEST (resumable).")
    convert.add_argument("src", metavar="SRC")
    convert.add_argument("dest", metavar="DEST")
    convert.add_argument("--shards", type=int, default=1, help="Files per split (default 1).")
    convert.add_argument("--workers", type=int, default=0, help="Decoding processes (default 0: this one).")
    _source_arguments(convert)

    inspect = add("inspect", help="Counts, shapes, dtypes, labels and a PNG grid of PATH.")
    inspect.add_argument("path", metavar="PATH")
    inspect.add_argument("--grid", metavar="OUT.png", help="Grid of examples (default: ./inspect-SPLIT.png; 'none': no grid).")
    inspect.add_argument("--grid-count", type=int, default=64, help="Examples in the grid (default 64).")
    inspect.add_argument("--limit", type=int, help="Read only the first N examples of each split.")
    _source_arguments(inspect)

    stats = add("stats", help="Inception reference statistics (mu, sigma) of a split, pytorch-fid's .npz.")
    stats.add_argument("path", metavar="PATH")
    stats.add_argument("--split", default="train", help="Split to describe (default train).")
    stats.add_argument("--out", required=True, metavar="REF.npz")
    stats.add_argument("--weights", required=True, metavar="INCEPTION.safetensors", help="From `workshop-data convert-weights`.")
    _source_arguments(stats, splits=False)

    weights = add("convert-weights", help="Published weights (pytorch-fid's Inception .pth, a diffusers AutoencoderKL "
                  "state dict) to safetensors.")
    weights.add_argument("network", choices=["inception", "sd-vae"])
    weights.add_argument("source", metavar="SOURCE", help="inception: pt_inception-*.pth; sd-vae: the VAE's safetensors "
                         "(diffusers' names; its config.json beside it is read for the GroupNorm groups)")
    weights.add_argument("out", metavar="OUT.safetensors")

    encode = add("encode", help="Latents of SRC under a frozen autoencoder into sharded ArrayRecord files in DEST "
                 "(resumable; workshop_dist.encode).")
    encode.add_argument("src", metavar="SRC", help="As for convert, or 'digits' (the built-in data; with --image-size).")
    encode.add_argument("dest", metavar="DEST")
    encode.add_argument("--autoencoder", required=True, metavar="RUN_OR_WEIGHTS",
                        help="An autoencoder run (workdir or checkpoint directory) or weights from convert-weights sd-vae.")
    encode.add_argument("--store", choices=["moments", "sample"], default="moments",
                        help="moments: the posterior's mean and log-variance (default; training draws from them); "
                        "sample: one draw per example.")
    encode.add_argument("--shards", type=int, default=1, help="Files per split (default 1).")
    encode.add_argument("--batch-size", type=int, default=16, help="Images per device per encoder call (default 16; "
                        "the files are then the same on any number of devices).")
    encode.add_argument("--seed", type=int, default=0, help="The draws of --store sample.")
    encode.add_argument("--max-level", type=float, help="The white pixel value (default: 16 for digits, else the dtype's max).")
    _source_arguments(encode)
    return parser


def _flags(parser: argparse.ArgumentParser, *, default) -> None:
    parser.add_argument("--quiet", action="store_true", default=default, help="No progress bars or information messages.")
    parser.add_argument("--debug", action="store_true", default=default, help="Show tracebacks for user errors.")


def _source_arguments(parser: argparse.ArgumentParser, *, splits: bool = True) -> None:
    if splits:
        parser.add_argument("--splits", help="Comma-separated splits (default: all the source has).")
    parser.add_argument("--image-size", type=int, help="Resize the shorter side to S, then crop the center S x S.")
    parser.add_argument("--channels", type=int, choices=[1, 3], help="Convert images to grey (1) or RGB (3).")
    parser.add_argument("--crop-only", action="store_true", help="With --image-size: crop without resizing.")
    parser.add_argument("--skip-bad", action="store_true", help="Leave out unreadable files (listed) instead of stopping.")
    parser.add_argument("--labels", metavar="LABELS.npy", help="Labels for an IMAGES.npy source.")
    parser.add_argument("--data-dir", help="TFDS data dir (default: $WORKSHOP_DATA_DIR or ~/.cache/workshop_dist/data).")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from workshop_dist.config import WorkshopError

    try:
        return COMMANDS[args.command](args)
    except WorkshopError as err:
        if args.debug:
            traceback.print_exc()
        print(f"workshop-data: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("workshop-data: interrupted (convert resumes when run again).", file=sys.stderr)
        return 130


def _open(args: argparse.Namespace, src: str, *, native: bool = False, split: str | None = None):
    from workshop_dist.config import ConfigError
    from workshop_dist.data.splits import ImageOptions, open_dataset

    if args.image_size is not None and args.image_size < 1:
        raise ConfigError(f"--image-size must be positive, got {args.image_size}.")
    if args.crop_only and args.image_size is None:
        raise ConfigError("--crop-only needs --image-size (the size to crop to).")
    splits = [split] if split else [s for s in (getattr(args, "splits", None) or "").split(",") if s] or None
    options = ImageOptions(args.image_size, args.channels, not args.crop_only, args.skip_bad, native)
    return open_dataset(src, splits=splits, data_dir=args.data_dir, labels=args.labels, options=options)


def run_convert(args: argparse.Namespace) -> int:
    from workshop_dist.config import ConfigError
    from workshop_dist.data.convert import convert

    if args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}.")
    dataset = _open(args, args.src)
    settings = {"image_size": args.image_size, "channels": args.channels, "crop_only": args.crop_only}
    manifest = convert(
        dataset, args.dest, shards=args.shards, workers=args.workers, settings=settings, skip_bad=args.skip_bad,
        progress=False if args.quiet else None,
    )
    skipped = [entry for shard in manifest["shards"].values() for entry in shard["skipped"]]
    for split, count in manifest["written"].items():
        print(f"{split}: {count} examples in {manifest['splits'][split]['shards']} shard(s)")
    for message in skipped:
        print(f"skipped: {message}", file=sys.stderr)
    dest = os.path.abspath(args.dest)
    print(f"Train on them with data.source=array_record:{dest}/{{split}}-*-of-*.array_record")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from workshop_dist.data.summary import format_summary, summarize, write_grid

    dataset = _open(args, args.path, native=True)
    progress = False if args.quiet else None
    for split, source in dataset.splits.items():
        print(format_summary(summarize(source, limit=args.limit, progress=progress), dataset.classes))
        if (args.grid or "").lower() != "none" and args.grid_count > 0:
            out = Path(args.grid.replace("{split}", split) if args.grid else f"inspect-{split}.png")
            if args.grid and len(dataset.splits) > 1 and "{split}" not in args.grid:
                out = out.with_name(f"{out.stem}-{split}{out.suffix}")
            shown = write_grid(source, out, count=args.grid_count)
            print(f"  grid     {out} ({shown} examples)")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    stats = hook("stats")
    dataset = _open(args, args.path, split=args.split)
    stats(dataset.splits[args.split], Path(args.out), Path(args.weights))
    print(f"Reference statistics of {dataset.splits[args.split].name} written to {args.out}")
    return 0


def run_convert_weights(args: argparse.Namespace) -> int:
    from workshop_dist.config import ConfigError

    if not Path(args.source).is_file():
        raise ConfigError(f"Weights file {args.source} does not exist.")
    if args.network == "sd-vae":  # Stable Diffusion's VAE: the autoencoder family's own converter
        from workshop_dist.models.autoencoder_weights import convert_sd_vae

        convert_sd_vae(Path(args.source), Path(args.out))
    else:
        hook("convert-weights")(args.network, Path(args.source), Path(args.out))
    print(f"{args.network} weights written to {args.out}")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    import jax

    from workshop_dist.config import ConfigError
    from workshop_dist.encode import digits_dataset, encode_dataset
    from workshop_dist.training.first_stage import load_first_stage

    if args.src == "digits":
        if args.image_size is not None and args.image_size < 1:
            raise ConfigError(f"--image-size must be positive, got {args.image_size}.")
        dataset = digits_dataset(args.image_size, [s for s in (args.splits or "").split(",") if s] or None)
    else:
        dataset = _open(args, args.src)
    stage = load_first_stage(args.autoencoder, mesh=None)
    settings = {"autoencoder": os.path.abspath(args.autoencoder), "image_size": args.image_size, "channels": args.channels,
                "crop_only": args.crop_only}
    manifest = encode_dataset(dataset, args.dest, stage, shards=args.shards, store=args.store, batch_size=args.batch_size,
                              seed=args.seed, max_level=args.max_level, settings=settings,
                              progress=False if args.quiet else None)
    for split, count in manifest["written"].items():
        print(f"{split}: {count} latents in {manifest['splits'][split]['shards']} shard(s)")
    dest = os.path.abspath(args.dest)
    print(f"On {jax.local_device_count()} device(s); scale factor {stage.scale_factor:g}. Train on them with "
          f"data.source=array_record:{dest}/{{split}}-*-of-*.array_record data.normalize=latent "
          f"model.decoder={os.path.abspath(args.autoencoder)}")
    return 0


def hook(command: str) -> Callable:
    """The function behind ``command`` (see :data:`HOOKS`); a clear error while it does not exist."""
    from workshop_dist.config import ConfigError

    module_name, _, function = HOOKS[command].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not module_name.startswith(err.name):
            raise  # the hook exists but one of its own imports is missing: show that
        module = None
    if module is None or not hasattr(module, function):
        raise ConfigError(
            f"workshop-data {command} is not available: {HOOKS[command]} is not in this installation."
        )
    return getattr(module, function)


COMMANDS = {"convert": run_convert, "inspect": run_inspect, "stats": run_stats, "convert-weights": run_convert_weights,
            "encode": run_encode}


if __name__ == "__main__":  # guarded: convert's worker processes start with spawn and re-import __main__
    sys.exit(main())
