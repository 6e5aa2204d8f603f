"""The ``imgcluster`` command line: a thin layer over train, assign, evaluate and export.

Results go to stdout, progress and warnings to stderr. Exit codes: 0 success,
1 runtime error, 2 usage error, 130 interrupted. Errors are one line; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import ImgclusterError, UsageError
from .report import Reporter, counted

app = typer.Typer(
    name="imgcluster",
    help="Sort folders of images into groups without labels.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars, notes or warnings on stderr.")
]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
Device = Annotated[str, typer.Option(help="auto (GPU when present), cpu, cuda or cuda:N.")]
Workers = Annotated[int | None, typer.Option(help="Decoding processes (default: all cores).")]
Strict = Annotated[
    bool, typer.Option("--strict", help="Stop with an error at the first unreadable file.")
]
Root = Annotated[
    Path | None,
    typer.Option(
        help="Folder that relative paths in LABELS start from "
        "(default: the run's image folder, else the current one)."
    ),
]

T = TypeVar("T")


def _config_callback(ctx: typer.Context, param: Any, value: Path | None) -> Path | None:
    """Eager: load the file's values as this command's defaults before the other options."""
    if value is not None:
        from .config import option_defaults

        names = {p.name: p.name for p in ctx.command.params if p.name}
        # the file may use the flag's name (json) or Python's (as_json)
        for p in ctx.command.params:
            names.update(
                {o.lstrip("-").replace("-", "_"): p.name for o in p.opts if o.startswith("--")}
            )
        try:
            defaults = option_defaults(value, ctx.command.name or "", names)
        except ImgclusterError as exc:
            _err.print(f"error: {exc}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


Config = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML file of option values (a table named after the command, or top-level keys; "
        "a run's config.toml replays it). The command line wins.",
        callback=_config_callback,
        is_eager=True,
        show_default=False,
    ),
]


def _run(debug: bool, work: Callable[[], T]) -> T:
    """Run a command body, turning exceptions into one-line errors and exit codes."""
    try:
        return work()
    except KeyboardInterrupt:
        if debug:
            raise
        _err.print("interrupted", markup=False)
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # the reader went away (`imgcluster assign ... | head`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(141) from None
    except ImgclusterError as exc:
        if debug:
            raise
        _err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exc.exit_code) from None
    except Exception as exc:
        if debug:
            raise
        _err.print(
            f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", markup=False
        )
        raise typer.Exit(1) from None


def _reporter(quiet: bool) -> Reporter:
    return Reporter(quiet=quiet, console=_err)


def _version(value: bool) -> None:
    if value:
        _out.print(f"imgcluster {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Sort folders of images into groups without labels."""


def _parse_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param takes KEY=VALUE, got {item!r}")
        params[key.strip().replace("-", "_")] = value.strip()
    return params


@app.command()
def train(
    images: Annotated[
        list[str] | None,
        typer.Argument(help="Folders, image files or glob patterns.", show_default=False),
    ] = None,
    k: Annotated[
        str | None,
        typer.Option("--k", "-k", help="Number of clusters, or auto.", show_default=False),
    ] = None,
    k_range: Annotated[
        str, typer.Option(help="With --k auto: the K tried, LO:HI (inclusive).")
    ] = "2:20",
    method: Annotated[
        str, typer.Option(help="Clustering method (see `imgcluster methods`).")
    ] = "kmeans",
    backbone: Annotated[
        str,
        typer.Option(
            help="Cluster a pretrained network's features: none (train on pixels), "
            "efficientnet-lite0, torchvision:NAME or timm:NAME."
        ),
    ] = "none",
    weights: Annotated[
        Path | None,
        typer.Option(help="The backbone's weights as a state-dict file (offline use)."),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(help="Method hyper-parameter KEY=VALUE (repeatable).", show_default=False),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (method default).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (method default).")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder (default: runs/<folder>-<method>, numbered if taken)."),
    ] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where default run folders go.")] = Path("runs"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Device = "auto",
    image_size: Annotated[
        int | None,
        typer.Option(
            help="Working size in pixels (default: the images' median shorter side, at most 64)."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --out folder.")
    ] = False,
    strict: Strict = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Do not read or write the decode cache.")
    ] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Decode cache folder (default: $IMGCLUSTER_CACHE or ~/.cache/imgcluster)."
        ),
    ] = None,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile the networks (GPU runs).")
    ] = False,
    precision: Annotated[
        str,
        typer.Option(
            help="Training arithmetic: auto (bf16 on a GPU, fp32 on the CPU), bf16 (also on "
            "the CPU: ADC trains about 2x faster on CPUs with AMX, 1.5x with AVX-512 "
            "BF16 alone), or fp32."
        ),
    ] = "auto",
    checkpoint_every: Annotated[
        int,
        typer.Option(help="Epochs between checkpoints (0: at most every two minutes)."),
    ] = 0,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue an interrupted run folder with its recorded settings."),
    ] = None,
    sheets: Annotated[
        bool, typer.Option("--sheets/--no-sheets", help="Write contact sheets into RUN/sheets/.")
    ] = True,
    workers: Workers = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
    config: Config = None,
    debug: Debug = False,
) -> None:
    """Train a clustering method on a folder of images and write a run folder."""

    def work() -> None:
        from .autok import parse_range
        from .training import train as run_train

        result = run_train(
            images,
            _parse_k(k),
            k_range=parse_range(k_range),
            method=method,
            backbone=backbone,
            weights=weights,
            params=_parse_params(param or []),
            epochs=epochs,
            batch_size=batch_size,
            out=out,
            runs_dir=runs_dir,
            seed=seed,
            device=device,
            image_size=image_size,
            force=force,
            strict=strict,
            use_cache=not no_cache,
            cache_dir=cache_dir,
            workers=workers,
            compile=compile,
            precision=precision,
            checkpoint_every=checkpoint_every,
            resume=resume,
            sheets=sheets,
            reporter=_reporter(quiet),
        )
        if as_json:
            _print_json({**vars(result), "run_dir": str(result.run_dir)})
            return
        _out.print(f"run folder: {result.run_dir}", markup=False)
        if result.auto_k:
            curve = "  ".join(f"{k}:{v:.3f}" for k, v in result.auto_k["scores"].items())
            _out.print(f"K = {result.k} chosen by silhouette over {curve}", markup=False)
        _out.print(
            f"{counted(result.images, 'image')} clustered into {counted(result.k, 'group')} "
            f"by {result.method} on {result.device} in {result.seconds:.1f} s "
            f"({result.image_size} px, {counted(result.channels, 'channel')}); "
            f"{counted(result.skipped, 'file')} skipped",
            markup=False,
        )
        _out.print(_sizes_table(dict(enumerate(result.sizes))))

    _run(debug, work)


@app.command()
def assign(
    run: Annotated[
        Path, typer.Argument(help="A run folder written by `imgcluster train`.", show_default=False)
    ],
    images: Annotated[
        list[str],
        typer.Argument(
            help="Folders, image files, glob patterns; - reads paths from stdin, one per line.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="Write the labels CSV here (default: stdout).")
    ] = None,
    device: Device = "auto",
    workers: Workers = None,
    strict: Strict = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON Lines (one object per image) instead of CSV.")
    ] = False,
    quiet: Quiet = False,
    config: Config = None,
    debug: Debug = False,
) -> None:
    """Label images with a trained run; CSV path,cluster,confidence,distance."""

    def work() -> None:
        from .assignment import assign as run_assign

        result = run_assign(
            run,
            _expand_stdin(images),
            out=out,
            stream=sys.stdout,
            device=device,
            workers=workers,
            strict=strict,
            fmt="jsonl" if as_json else "csv",
            reporter=_reporter(quiet),
        )
        if not quiet:
            _err.print(
                f"{counted(result.images, 'image')} assigned, {len(result.skipped)} skipped"
                + (f"; labels in {out}" if out else ""),
                markup=False,
            )

    _run(debug, work)


def _parse_k(k: str | None) -> int | str | None:
    if k is None or k == "auto":
        return k
    try:
        return int(k)
    except ValueError:
        raise UsageError(f"--k must be a whole number >= 1 or 'auto', got {k!r}") from None


def _expand_stdin(items: list[str]) -> list[str]:
    """``-`` stands for the paths on stdin, one per line."""
    out: list[str] = []
    for item in items:
        if item == "-":
            out.extend(line.rstrip("\r\n") for line in sys.stdin if line.strip())
        else:
            out.append(item)
    return out


@app.command()
def evaluate(
    labels: Annotated[
        Path,
        typer.Argument(
            help="labels.csv (or .json), or a run folder, to score.", show_default=False
        ),
    ],
    truth: Annotated[
        str,
        typer.Option(
            help="auto (folder names when there are several), folders, "
            "none, or a CSV with columns path,label."
        ),
    ] = "auto",
    root: Root = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
    config: Config = None,
    debug: Debug = False,
) -> None:
    """Score labels: ACC (Hungarian), NMI, ARI against ground truth; label-free scores always."""

    def work() -> None:
        from .evaluation import evaluate as run_evaluate

        result = run_evaluate(labels, truth=truth, root=root, reporter=_reporter(quiet))
        if as_json:
            _print_json(result.to_dict())
            return
        _print_evaluation(result)

    _run(debug, work)


@app.command()
def export(
    labels: Annotated[
        Path, typer.Argument(help="labels.csv (or .json) to export.", show_default=False)
    ],
    to: Annotated[Path, typer.Option(help="Folder to sort the images into.", show_default=False)],
    mode: Annotated[str, typer.Option(help="copy, link (symbolic), hardlink or move.")] = "copy",
    fmt: Annotated[
        str, typer.Option("--format", help="Labels file written into --to: csv or json.")
    ] = "csv",
    root: Root = None,
    sheets: Annotated[
        bool, typer.Option("--sheets", help="Also write contact sheets into TO/sheets/.")
    ] = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
    config: Config = None,
    debug: Debug = False,
) -> None:
    """Sort the images into TO/cluster_NN/ folders and write the labels there."""

    def work() -> None:
        from .exporting import export as run_export

        result = run_export(
            labels, to, mode=mode, fmt=fmt, root=root, sheets=sheets, reporter=_reporter(quiet)
        )
        if as_json:
            _print_json(
                {
                    "exported": result.exported,
                    "already_there": result.already_there,
                    "to": str(result.to),
                    "mode": mode,
                    "labels_file": str(result.labels_file),
                    "skipped": [{"path": p, "reason": r} for p, r in result.skipped],
                }
            )
        else:
            n = result.already_there
            there = f", {n} of them already there" if n else ""
            _out.print(
                f"{counted(result.exported, 'image')} exported to {result.to} ({mode}){there}; "
                f"{len(result.skipped)} skipped; labels in {result.labels_file}",
                markup=False,
            )
        if result.skipped:
            raise typer.Exit(1)

    _run(debug, work)


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="A run folder.", show_default=False)],
    truth: Annotated[
        str, typer.Option(help="As for `evaluate`: auto, folders, none or a CSV.")
    ] = "auto",
    out: Annotated[
        Path | None, typer.Option(help="Where to write (default: RUN/report.html).")
    ] = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
    config: Config = None,
    debug: Debug = False,
) -> None:
    """Write one self-contained HTML page about a run: scores, sizes, map, curves, galleries."""

    def work() -> None:
        from .html_report import build_report

        path = build_report(run, out, truth=truth, reporter=_reporter(quiet))
        if as_json:
            _print_json({"report": str(path)})
        else:
            _out.print(f"report: {path}", markup=False)

    _run(debug, work)


@app.command("methods")
def methods_command(as_json: AsJson = False, debug: Debug = False) -> None:
    """List the clustering methods (with --json: their parameters and defaults too)."""

    def work() -> None:
        import dataclasses

        from .methods import list_methods

        if as_json:
            _print_json(
                {
                    "methods": [
                        {
                            "name": cls.name,
                            "summary": cls.summary,
                            "parameters": {
                                f.name: f.default for f in dataclasses.fields(cls.Config)
                            },
                        }
                        for cls in list_methods()
                    ]
                }
            )
            return
        for cls in list_methods():
            _out.print(f"{cls.name:<10} {cls.summary}", markup=False)

    _run(debug, work)


def _sizes_table(sizes: dict[int, int]) -> Table:
    table = Table("cluster", "images", "share", box=None, pad_edge=False)
    total = sum(sizes.values()) or 1
    for c, n in sorted(sizes.items()):
        table.add_row(str(c), str(n), f"{100 * n / total:.1f}%")
    return table


def _print_evaluation(r: Any) -> None:
    if r.acc is not None:
        source = "folder names" if r.truth in ("auto", "folders") else r.truth
        _out.print(
            f"ground truth: {source} ({counted(len(r.classes), 'class', 'classes')}, "
            f"{counted(r.scored, 'image')} scored)",
            markup=False,
        )
        _out.print(f"ACC {r.acc:.4f}   NMI {r.nmi:.4f}   ARI {r.ari:.4f}")
    else:
        _out.print("no ground truth: label-free scores only")
    sil = "n/a" if r.silhouette is None else f"{r.silhouette:.4f}"
    _out.print(
        f"{counted(r.images, 'image')} in {counted(r.clusters, 'cluster')}; "
        f"size balance {r.balance:.3f}, "
        f"mean confidence {r.mean_confidence:.3f}, silhouette {sil}"
    )
    if r.confusion is None:
        _out.print(_sizes_table(r.sizes))
        return
    table = Table("cluster", "images", "matched class", *r.classes, box=None, pad_edge=False)
    for row, c in zip(r.confusion, sorted(r.sizes), strict=False):
        table.add_row(str(c), str(r.sizes[c]), r.mapping.get(c, "-"), *map(str, row))
    _out.print(table)


def _print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
