"""The certood command line: parse, call the library, render, choose the exit code.

Exit codes: 0 ok, 1 gate failed, 2 usage or spec error, 3 runtime or data error.
Machine formats print only their payload on stdout; logs and progress go to stderr.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import click

from certood.errors import CertoodError, SpecError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RUNTIME = 0, 1, 2, 3


def _progress(iterable, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, unit="img", leave=False,
                disable=None)  # None: off when stderr is not a terminal


def _fail(err: Exception, debug: bool) -> None:
    if isinstance(err, SpecError):
        for issue in err.issues:
            click.echo(str(issue), err=True)
        click.echo(f"{sum(i.severity == 'error' for i in err.issues)} error(s)", err=True)
        sys.exit(EXIT_USAGE)
    if isinstance(err, CertoodError):
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    if debug:
        traceback.print_exc()
    click.echo(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback; "
               "please report it)", err=True)
    sys.exit(EXIT_RUNTIME)


def _run(fn, debug: bool):
    try:
        return fn()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - the one place exceptions become exit codes
        _fail(err, debug)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="certood")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """certood: OOD monitors for object detectors, with certificates."""
    ctx.obj = {"debug": debug}


@main.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def validate(specs: tuple[Path, ...], fmt: str) -> None:
    """Validate monitor specs; exit 2 with file:line:col messages when any is invalid."""
    from certood.spec import check_spec_file

    all_issues = []
    for path in specs:
        all_issues += check_spec_file(path)
    errors = [i for i in all_issues if i.severity == "error"]
    if fmt == "json":
        click.echo(json.dumps([{**i.__dict__} for i in all_issues], indent=2))
    else:
        for issue in all_issues:
            click.echo(str(issue) if issue.severity == "error" else f"warning: {issue}", err=True)
        if not errors:
            click.echo(f"{len(specs)} spec(s) valid", err=True)
    sys.exit(EXIT_USAGE if errors else EXIT_OK)


@main.command()
def schema() -> None:
    """Print the JSON Schema of monitor specs (for editor completion)."""
    from certood.spec import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Monitor directory to write (default: <output.dir>/monitor).")
@click.pass_context
def calibrate(ctx: click.Context, spec_path: Path, out: Path | None) -> None:
    """Fit scores and thresholds on the spec's ID data; write a monitor artifact."""
    def work():
        from certood.artifacts import save_monitor
        from certood.check import load_spec_detector
        from certood.monitor import calibrate as calibrate_monitor
        from certood.spec import load_spec

        spec = load_spec(spec_path)
        target = out or _default_out(spec) / "monitor"
        detector = load_spec_detector(spec)
        monitor, _ = calibrate_monitor(spec, detector, detector.num_classes, progress=_progress)
        save_monitor(monitor, target)
        click.echo(f"monitor written to {target}", err=True)
        for name, t in monitor.thresholds.items():
            click.echo(f"  {name}: threshold {t:.4f}", err=True)
    _run(work, ctx.obj["debug"])


def _default_out(spec) -> Path:
    if spec.output.dir is None:
        raise CertoodError("no output directory: pass --out or set output.dir in the spec")
    return Path(spec.output.dir)


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--monitor", "monitor_dir", type=click.Path(path_type=Path), default=None,
              help="A calibrated monitor directory (default: calibrate first).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory (default: output.dir of the spec).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def check(ctx: click.Context, spec_path: Path, monitor_dir: Path | None, out: Path | None, fmt: str) -> None:
    """Run the monitor over the spec's ID test and OOD sets; write boxes.jsonl, metrics.json, report.md."""
    def work():
        from certood import report
        from certood.check import run_check
        from certood.spec import load_spec

        spec = load_spec(spec_path)
        result = run_check(spec, out or _default_out(spec), monitor_dir, progress=_progress)
        if fmt == "json":
            click.echo(json.dumps(result.metrics, indent=2))
        else:
            click.echo(report.summary_text(result.metrics), nl=False)
            click.echo(f"outputs: {result.out_dir}/ (boxes.jsonl: {result.n_boxes} boxes, metrics.json, "
                       "report.md)")
    _run(work, ctx.obj["debug"])


@main.group()
def data() -> None:
    """Bundled datasets."""


@data.command("digitsdet")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Target directory (default: the cache, $CERTOOD_CACHE or ~/.cache/certood).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def data_digitsdet(ctx: click.Context, out: Path | None, seed: int) -> None:
    """Generate DigitsDet (COCO format) from scikit-learn's real handwritten digits."""
    def work():
        from certood.data.digitsdet import dataset_dir, generate_digitsdet

        root = generate_digitsdet(out or dataset_dir(seed), seed)
        click.echo(str(root))
    _run(work, ctx.obj.get("debug", False) if ctx.obj else False)


if __name__ == "__main__":
    main()
