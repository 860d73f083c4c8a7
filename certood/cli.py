"""The certood command line: parse, call the library, render, choose the exit code.

Exit codes: 0 ok, 1 gate failed, 2 usage or spec error, 3 runtime or data error.
Machine formats print only their payload on stdout; logs and progress go to stderr.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import click

from certood.errors import CertoodError, SpecError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RUNTIME = 0, 1, 2, 3


PROGRESS_EVERY_S = 30.0  # a log line this often when stderr is not a terminal (CI, clusters)


def _progress(iterable, total: int, desc: str):
    """A progress bar on a terminal; elsewhere a line per PROGRESS_EVERY_S with the rate and ETA."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, unit="img", leave=False)
    return _progress_lines(iterable, total, desc)


def _progress_lines(iterable, total: int, desc: str, every: float = PROGRESS_EVERY_S):
    import time

    start = last = time.monotonic()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every or (done == total and last > start):
            rate = done / max(now - start, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("inf")
            click.echo(f"{desc}: {done}/{total}, {rate:.1f}/s, ETA {eta:.0f} s", err=True)
            last = now


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


_CLI_PID = os.getpid()


def _terminated(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so staged outputs are removed and the old ones stay."""
    if os.getpid() != _CLI_PID:  # a forked worker inherited the handler: die as it would have
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    click.echo("terminated", err=True)
    sys.exit(128 + signum)


def _run(fn, debug: bool):
    try:
        signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread (an embedding host): keep its handler
        pass
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
    """Fit scores and thresholds on the spec's ID data; write a monitor artifact.

    \b
    The monitor directory is replaced whole, and only if it is missing, empty or a monitor
    certood wrote (anything else: exit 2, untouched); missing parents are created.
    """
    def work():
        from certood.artifacts import save_monitor, stage_monitor
        from certood.check import load_spec_detector
        from certood.monitor import calibrate as calibrate_monitor
        from certood.spec import load_spec

        spec = load_spec(spec_path)
        target = out or _default_out(spec) / "monitor"
        with stage_monitor(target) as staged:  # refuse or fail on the location before any work
            detector = load_spec_detector(spec)
            monitor, _ = calibrate_monitor(spec, detector, detector.num_classes, progress=_progress)
            save_monitor(monitor, target, staged)
        click.echo(f"monitor written to {target}; thresholds at {spec.threshold.describe()}", err=True)
        fallbacks = [c for c, r in monitor.calibration.get("threshold", {}).get("classes", {}).items() if r["fallback"]]
        for name, t in monitor.thresholds.items():
            per_class = monitor.class_thresholds.get(name)
            extra = (" (per class: " + ", ".join(f"{c}={v:.4f}" for c, v in enumerate(per_class) if c) + ")"
                     if per_class else "")
            click.echo(f"  {name}: threshold {t:.4f}{extra}", err=True)
        if fallbacks:
            click.echo(f"  classes {', '.join(fallbacks)}: fewer than {monitor.calibration['threshold']['min_class_boxes']} "
                       "boxes, global thresholds used", err=True)
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
              help="Output directory (default: output.dir of the spec). Replaced whole when the run "
                   "ends (a failed or killed run leaves the old results); refused if it holds files "
                   "certood did not write.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("--save-features", is_flag=True,
              help="Also write features.safetensors: every monitored box's tapped features and logits "
                   "(keys <dataset>/<tap point>, <dataset>/box_index = line in boxes.jsonl).")
@click.option("--resume", is_flag=True,
              help="Continue a killed or interrupted check of the same --out from its shards, redoing "
                   "no finished image (same spec, detector and monitor).")
@click.option("--workers", type=click.IntRange(0, 256), default=None,
              help="DataLoader processes decoding images (default: run.workers of the spec, 0).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run on Ray: a local instance (no ADDRESS) or the cluster at ADDRESS "
                   "(pip install 'certood[ray]'); run.ray of the spec sets the worker count.")
@click.pass_context
def check(ctx: click.Context, spec_path: Path, monitor_dir: Path | None, out: Path | None, fmt: str,
          save_features: bool, resume: bool, workers: int | None, ray_address: str | None) -> None:
    """Run the monitor over the spec's ID test and OOD sets; write boxes.jsonl, metrics.json, report.md."""
    def work():
        from certood import report
        from certood.check import run_check, with_run_options
        from certood.spec import load_spec

        spec = with_run_options(load_spec(spec_path), workers=workers, ray_address=ray_address)
        result = run_check(spec, out or _default_out(spec), monitor_dir, progress=_progress,
                           save_features=save_features, resume=resume)
        if fmt == "json":
            click.echo(json.dumps(result.metrics, indent=2))
        else:
            click.echo(report.summary_text(result.metrics), nl=False)
            click.echo(f"outputs: {result.out_dir}/ (boxes.jsonl: {result.n_boxes} boxes, metrics.json, "
                       "report.md, report.html, plots/)")
    _run(work, ctx.obj["debug"])


@main.command()
@click.argument("results_dir", metavar="RESULTS_DIR", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("--allow-unconfirmed", is_flag=True,
              help="Also pass certificates of a method tighter than the recheck's CROWN (alpha-CROWN) "
                   "that it cannot re-prove, if they survive its own attack; they are still listed.")
@click.option("--from-images", is_flag=True,
              help="Re-run the detector on every image with a certified box and compare each box's "
                   "feature with the stored one before re-proving.")
@click.pass_context
def recheck(ctx: click.Context, results_dir: Path, fmt: str, allow_unconfirmed: bool, from_images: bool) -> None:
    """Re-prove a check's certificates in float64 (own IBP and CROWN; no auto_LiRPA), against
    the detector's weights and the monitor they were made for.

    \b
    Exit codes: 0 every certificate re-verified, 1 a disagreement (a certificate
    contradicted, not re-proven unless --allow-unconfirmed, or results that do not
    match the detector or the monitor), 2 usage error, 3 missing or unreadable
    results, monitor or detector.
    """
    def work() -> int:
        from certood.artifacts import results_incomplete
        from certood.errors import ArtifactError
        from certood.recheck import recheck as run_recheck, render_text

        why = results_incomplete(results_dir)  # a killed or older run: refuse, do not re-verify a mix
        if why:
            raise ArtifactError(why)
        report = run_recheck(results_dir, allow_unconfirmed=allow_unconfirmed, from_images=from_images)
        if fmt == "json":
            click.echo(json.dumps(report.to_json(), indent=2))
        else:
            click.echo(render_text(report), nl=False)
        return EXIT_OK if report.passes(allow_unconfirmed) else EXIT_FAILED

    sys.exit(_run(work, ctx.obj["debug"]))


GATE_EXIT_CODES = """\b
Exit codes:
  0  every policy passed (WARN and SKIPPED pass, unless --warn-as-fail)
  1  a policy FAILED (or a WARN under --warn-as-fail)
  2  usage, spec or policy file error (whatever the flags)
  3  no FAIL, but a policy is ERROR: its metric could not be read (results
     missing or corrupt, a data set or score missing, NaN)
--exit-zero turns 1 and 3 (and data errors) into 0; never 2 (internal
  errors, which are bugs, still exit 3)."""


def _gate_exit_code(report, warn_as_fail: bool) -> int:
    from certood.gate import Status

    statuses = set(report.statuses)
    if Status.FAIL in statuses or (warn_as_fail and Status.WARN in statuses):
        return EXIT_FAILED
    return EXIT_RUNTIME if Status.ERROR in statuses else EXIT_OK


def _write_output(path: Path, text: str, what: str) -> None:
    from certood.artifacts import atomic_write_text

    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise CertoodError(f"{path}: cannot write the {what} ({e.strerror or e})") from None
    click.echo(f"{what} written to {path}", err=True)


@main.command(epilog=GATE_EXIT_CODES)
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--results", "results_dir", required=True, type=click.Path(path_type=Path),
              help="A `certood check` output directory (its metrics.json) to judge.")
@click.option("--baseline", "baseline_dir", type=click.Path(path_type=Path), default=None,
              help="The `certood check` output of the baseline model, for baseline policies.")
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), default=None,
              help="A policy file (gate: [...]) checked in addition to the spec's gate: list.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "junit", "github"]), default="text",
              help="stdout format; json, junit and github print only their payload.")
@click.option("--junit", "junit_path", type=click.Path(path_type=Path), default=None,
              help="Also write JUnit XML to this file.")
@click.option("--summary", "summary_path", type=click.Path(path_type=Path), default=None,
              help="Also write a Markdown summary to this file (e.g. $GITHUB_STEP_SUMMARY).")
@click.option("--warn-as-fail", is_flag=True, help="A WARN fails the gate (exit 1).")
@click.option("--exit-zero", is_flag=True, help="Exit 0 even when the gate fails or errs (report only).")
@click.pass_context
def gate(ctx: click.Context, spec_path: Path, results_dir: Path, baseline_dir: Path | None,
         policy_path: Path | None, fmt: str, junit_path: Path | None, summary_path: Path | None,
         warn_as_fail: bool, exit_zero: bool) -> None:
    """Pass or fail a release: judge a check's metrics.json against the spec's gate policies."""
    def work() -> int:
        from certood import gate as gating
        from certood.errors import UsageError
        from certood.spec import load_spec
        from certood.spec.loader import load_policy_file

        spec = load_spec(spec_path)
        policies = spec.gate + (load_policy_file(policy_path, spec) if policy_path is not None else ())
        if not policies:
            raise UsageError(f"{spec_path}: no gate policies: add a gate: list to the spec or pass --policy FILE")
        if baseline_dir is not None and not any(p.is_baseline for p in policies):
            click.echo("note: --baseline given, but no policy compares with a baseline", err=True)
        report = gating.evaluate_gate(spec, policies, results_dir, baseline_dir)
        for label, run in (("results", report.candidate), ("baseline", report.baseline)):
            if run is not None and run.error:
                click.echo(f"error: {label}: {run.error}", err=True)
        if fmt == "json":
            click.echo(gating.render_json(report), nl=False)
        elif fmt == "junit":
            click.echo(gating.render_junit(report, warn_as_fail), nl=False)
        elif fmt == "github":
            click.echo(gating.render_github(report, warn_as_fail), nl=False)
        else:
            click.echo(gating.render_text(report, warn_as_fail), nl=False)
        if junit_path is not None:
            _write_output(junit_path, gating.render_junit(report, warn_as_fail), "JUnit XML")
        if summary_path is not None:
            _write_output(summary_path, gating.render_markdown(report, warn_as_fail), "Markdown summary")
        return _gate_exit_code(report, warn_as_fail)

    def guarded() -> int:
        try:
            return work()
        except CertoodError as err:
            if not exit_zero or err.exit_code == EXIT_USAGE:
                raise
            click.echo(f"error: {err}", err=True)
            return EXIT_OK

    code = _run(guarded, ctx.obj["debug"])
    sys.exit(EXIT_OK if exit_zero else code)


@main.command("export")
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--monitor", "monitor_dir", required=True, type=click.Path(path_type=Path),
              help="The calibrated monitor directory to export.")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(path_type=Path),
              help="The ONNX file to write: tapped features in, scores and flag out.")
@click.option("--with-detector", is_flag=True,
              help="Prepend the spec's ONNX detector (kind: onnx, layout two_stage): image in, "
                   "detections with their scores and flag out.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def export(ctx: click.Context, spec_path: Path, monitor_dir: Path, onnx_path: Path, with_detector: bool,
           fmt: str) -> None:
    """Export a calibrated monitor as one ONNX graph (energy, max_logit, msp, mahalanobis scores)."""
    def work():
        from certood.artifacts import load_monitor, read_manifest
        from certood.check import load_spec_detector
        from certood.export import check_exportable, export_detector_monitor_onnx, export_monitor_onnx
        from certood.spec import load_spec

        spec = load_spec(spec_path)
        read_manifest(monitor_dir)  # fail fast, before the detector loads
        detector = load_spec_detector(spec)
        monitor = load_monitor(monitor_dir, spec, detector.weights_sha256)
        check_exportable(monitor)
        if with_detector:
            result = export_detector_monitor_onnx(detector, monitor, onnx_path)
        else:
            result = export_monitor_onnx(monitor, onnx_path)
        if fmt == "json":
            click.echo(json.dumps({"path": str(result.path), "inputs": result.inputs,
                                   "outputs": result.outputs, "metadata": result.metadata}, indent=2))
        else:
            click.echo(f"monitor exported to {result.path}", err=True)
            click.echo("  inputs:  " + ", ".join(f"{k} {v}" for k, v in result.inputs.items()), err=True)
            click.echo("  outputs: " + ", ".join(result.outputs), err=True)
            click.echo(f"  boxes with detector score < {monitor.detector_threshold:.4f} are not monitored "
                       "(apply that cut before the graph)", err=True)
    _run(work, ctx.obj["debug"])


def _generator_options(command):
    """--out and --seed of a dataset generator, and the click context."""
    command = click.pass_context(command)
    command = click.option("--seed", type=int, default=0, show_default=True)(command)
    return click.option("--out", type=click.Path(path_type=Path), default=None,
                        help="Target directory (default: the cache, $CERTOOD_CACHE or ~/.cache/certood).")(command)


@main.group()
def data() -> None:
    """Bundled datasets."""


@data.command("digitsdet")
@_generator_options
def data_digitsdet(ctx: click.Context, out: Path | None, seed: int) -> None:
    """Generate DigitsDet (COCO format) from scikit-learn's real handwritten digits."""
    def work():
        from certood.data.digitsdet import dataset_dir, generate_digitsdet

        root = generate_digitsdet(out or dataset_dir(seed), seed)
        click.echo(str(root))
    _run(work, ctx.obj.get("debug", False) if ctx.obj else False)


@data.command("digitsdet-video")
@_generator_options
def data_digitsdet_video(ctx: click.Context, out: Path | None, seed: int) -> None:
    """Generate DigitsDet-Video (COCO-video format: video-val, video-test, video-ood)."""
    def work():
        from certood.data.digitsdet_video import generate_digitsdet_video, video_dataset_dir

        root = generate_digitsdet_video(out or video_dataset_dir(seed), seed)
        click.echo(str(root))
    _run(work, ctx.obj.get("debug", False) if ctx.obj else False)


if __name__ == "__main__":
    main()
