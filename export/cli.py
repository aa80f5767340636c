"""``attention-export`` (or ``python -m export``): a thin CLI over ``export.build``.

attention-export build [RECIPE ...] [--repository DIR] [--skip-existing] [--force] [VARIANTS]
attention-export train RECIPE [--checkpoints DIR] [--force]
attention-export export RECIPE [--checkpoint DIR] [--version N] [--force] [VARIANTS]
attention-export eval [--repository DIR] [--checkpoints DIR] [--reports DIR] [--dates N] [--canvases N]
attention-export import-hf CHECKPOINT_DIR --name NAME [--repository DIR] [--version N] [--force]
attention-export list

VARIANTS, beside the fp32 version and at the same version: ``--quantize int8`` (``<name>-int8``),
``--precision fp16`` (``<name>-fp16``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from export import build, checkpoint, eval_report, recipes
from export.checkpoint import CheckpointError
from export.data import DatasetMissing
from export.eval_report import Sizes
from export.onnx_export import ExportVerificationError
from export.recipes import UnknownRecipe
from export.repository import RefuseOverwrite, check_target, version_dir
from export.variants import variant_name, write_variant
from service.inference.manifest import ManifestError

DEFAULT_REPOSITORY = Path("model_repository")
DEFAULT_CHECKPOINTS = Path("build/checkpoints")
DEFAULT_REPORTS = Path("reports/faithfulness")


class Unwritable(Exception):
    """A directory the command must write into cannot be written (said before any training)."""


#: rc 2: what was asked cannot be done as asked — a typo, a missing or wrong input, an existing
#: target, a directory it cannot write; each is found before the model is trained or written.
#: Anything else is a bug and keeps its traceback
CANNOT = (RefuseOverwrite, DatasetMissing, UnknownRecipe, ManifestError, CheckpointError, Unwritable)
#: rc 130, as a shell reports an interrupted command: Ctrl-C (versions are staged and renamed
#: whole, so the repository holds no part of the one being written; a checkpoint is written last)
INTERRUPTED = 130
#: rc 3: the model was exported and failed its verdict (parity, floors); nothing was written
REFUSED = (ExportVerificationError, build.FloorNotMet)


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where they say something: not a flag's True/False (``--no-int8``'s
    "default: True" read as "skipped by default"), not None, not twice."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attention-export",
        description="Train the demo models, export them (or local Hugging Face checkpoints) to ONNX with "
        "their attention as graph outputs, verified against PyTorch, into a versioned model repository.",
        formatter_class=_Defaults,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    where: dict[str, Any] = {"formatter_class": _Defaults}

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository")
        sp.add_argument(
            "--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS, help="checkpoints, one folder per recipe"
        )
        sp.add_argument("--version", type=_positive, default=1, help="version to write")
        sp.add_argument("--force", action="store_true", help="replace an existing version")
        sp.add_argument("--quantize", choices=["int8"], help="also write an int8 variant <name>-int8")
        sp.add_argument("--precision", choices=["fp16"], help="also write a float16 variant <name>-fp16")

    b = sub.add_parser("build", help="train (if no checkpoint) and export recipes", **where)
    b.add_argument("recipes", nargs="*", default=list(recipes.DEFAULT), help="recipes (`list` shows them)")
    b.add_argument("--skip-existing", action="store_true", help="leave versions that exist alone")
    b.add_argument(
        "--retrain", action="store_true",
        help="train even if a checkpoint exists, replacing it (versions exported from the old one keep "
        "serving; `make eval` can no longer compare them with PyTorch)",
    )  # fmt: skip
    common(b)
    t = sub.add_parser("train", help="train a recipe into a checkpoint directory", **where)
    t.add_argument("recipe", help="a recipe (`list` shows them)")
    t.add_argument(
        "--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS, help="checkpoints, one folder per recipe"
    )
    t.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    e = sub.add_parser("export", help="export a checkpoint into the repository", **where)
    e.add_argument("recipe", help="a recipe (`list` shows them)")
    e.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: CHECKPOINTS/RECIPE)")
    common(e)
    v = sub.add_parser("eval", help="score attention faithfulness → manifests' eval + a report", **where)
    v.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository")
    v.add_argument(
        "--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS, help="checkpoints, one folder per recipe"
    )
    v.add_argument("--reports", type=Path, default=DEFAULT_REPORTS, help="where the report is written")
    v.add_argument("--dates", type=_positive, default=Sizes.dates, help="held-out dates scored for alignment")
    v.add_argument("--canvases", type=_positive, default=Sizes.canvases, help="test canvases, pointing game")
    v.add_argument(
        "--no-int8", dest="int8", action="store_false", help="skip the int8 comparison (it runs by default)"
    )
    h = sub.add_parser("import-hf", help="export a local Hugging Face ViT/DeiT/MarianMT checkpoint", **where)
    h.add_argument(
        "checkpoint", type=Path, help="the checkpoint's directory (config.json, safetensors weights)"
    )
    h.add_argument("--name", required=True, help="model name in the repository")
    h.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository")
    h.add_argument("--version", type=_positive, default=1, help="version to write")
    h.add_argument("--force", action="store_true", help="replace an existing version")
    sub.add_parser("list", help="list the recipes")
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    interrupted = False

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        if interrupted:  # again: the first one's clean-up (a staging folder's removal) goes on
            print("interrupted; removing what was being written", file=sys.stderr)
            return
        interrupted = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        return _run(args)
    except BaseException as exc:
        # Ctrl-C, however the code it landed in wrapped it (torch.onnx.export turns it into its
        # own TorchExportError): one line, not a traceback
        if not (interrupted and _from_interrupt(exc)):
            raise
        print("interrupted: the repository holds no part of what was being written", file=sys.stderr)
        return INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous)


def _from_interrupt(exc: BaseException | None) -> bool:
    """``exc`` is a KeyboardInterrupt, or was raised while handling one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _run(args: argparse.Namespace) -> int:
    try:
        return _command(args)
    except CANNOT as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    except REFUSED as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 3


def writable(directory: Path, what: str) -> None:
    """Refuse at once a ``directory`` that cannot be written (created, where it does not exist),
    rather than after the training: by making and removing a folder in its nearest existing
    ancestor (permissions alone do not say, as root or on a read-only mount)."""
    ancestor = directory
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise Unwritable(f"{what} {directory}: {ancestor} is a file, not a directory")
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".write-check-", dir=ancestor))
    except OSError as exc:
        raise Unwritable(f"{what} {directory}: cannot write in {ancestor} ({exc.strerror})") from exc


def _command(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](args)


def _list(args: argparse.Namespace) -> int:
    for r in recipes.RECIPES.values():
        default = "*" if r.name in recipes.DEFAULT else " "
        print(f"{default} {r.name:24} {r.family:16} {r.description}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if not args.repository.is_dir():
        print(f"error: no model repository at {args.repository}", file=sys.stderr)
        return 2
    sizes = Sizes(dates=args.dates, canvases=args.canvases)
    print(f"wrote {eval_report.run(args.repository, args.checkpoints, args.reports, sizes, args.int8)}")
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from export import hf  # transformers is only imported for this command

    writable(args.repository, "--repository")
    try:
        target = hf.import_checkpoint(args.checkpoint, args.name, args.repository, args.version, args.force)
    except hf.UnsupportedCheckpoint as exc:  # e.g. a broken config.json, named
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {target}")
    return 0


def _train(args: argparse.Namespace) -> int:
    recipe = recipes.get(args.recipe)
    directory = args.checkpoints / recipe.name
    if (directory / checkpoint.WEIGHTS).exists() and not args.force:
        # versions exported from it name it by its sha256; a new one would orphan them
        raise RefuseOverwrite(f"{directory} already holds a checkpoint; pass --force to replace it")
    writable(directory, "--checkpoints")
    build.check_data(recipe)
    build.train(recipe, directory)
    print(f"wrote {directory}")
    return 0


def _export(args: argparse.Namespace) -> int:
    recipe = recipes.get(args.recipe)
    ckpt = args.checkpoint or args.checkpoints / recipe.name
    writable(args.repository, "--repository")
    build.check_data(recipe)  # the held-out evaluation reads it, after the export work
    target = build.export(
        ckpt, recipe, args.repository, args.version, args.force, args.quantize, args.precision
    )
    print(f"wrote {target}")
    return 0


def _build(args: argparse.Namespace) -> int:
    selected = [recipes.get(n) for n in args.recipes]  # fail on a typo before any work
    kinds = [kind for kind in (args.quantize, args.precision) if kind]
    todo, variants_of = [], []  # recipes to build; existing versions whose variants are missing
    for recipe in selected:
        target = version_dir(args.repository, recipe.name, args.version)
        if target.exists() and args.skip_existing and not args.force:
            missing = [
                k
                for k in kinds
                if not version_dir(args.repository, variant_name(recipe.name, k), args.version).exists()
            ]
            also = f"; writing its {', '.join(missing)} variants from it" if missing else ""
            print(f"{target} exists, skipping{also}")
            variants_of += [(recipe, target, kind) for kind in missing]
            continue
        todo.append(recipe)
    # every recipe's refusals before the first one trains: an existing version, a directory
    # that cannot be written (only where something will be written: a complete read-only
    # repository with --skip-existing is fine)
    for recipe, _, kind in variants_of:
        check_target(args.repository, variant_name(recipe.name, kind), args.version, force=False)
        writable(args.repository, "--repository")
        build.check_data(recipe)
    for recipe in todo:
        build.check_data(recipe)
        build.check_targets(
            args.repository, recipe.name, args.version, args.force, args.quantize, args.precision
        )
        writable(args.repository, "--repository")
        if args.retrain or not (args.checkpoints / recipe.name / checkpoint.WEIGHTS).exists():
            writable(args.checkpoints / recipe.name, "--checkpoints")
    for recipe, target, kind in variants_of:
        print(f"wrote {write_variant(target, recipe, args.repository, kind, force=False)}")
    for recipe in todo:
        start = time.perf_counter()
        ckpt = args.checkpoints / recipe.name
        if args.retrain or not (ckpt / checkpoint.WEIGHTS).exists():
            build.train(recipe, ckpt)
        target = build.export(
            ckpt, recipe, args.repository, args.version, args.force, args.quantize, args.precision
        )
        print(f"wrote {target} in {time.perf_counter() - start:.0f} s")
    return 0


#: each subcommand's function (its arguments: ``_parser``)
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": _list, "eval": _eval, "import-hf": _import_hf,
    "train": _train, "export": _export, "build": _build,
}  # fmt: skip

if __name__ == "__main__":
    sys.exit(main())
