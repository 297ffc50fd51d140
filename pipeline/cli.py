"""`okedit` command line: build, demo, validate, tiny-model.

Errors a user can fix (bad options, a folder that holds another build, a missing file)
print one line and exit with status 2; they never show a traceback.
"""

from __future__ import annotations

import inspect
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

app = typer.Typer(
    help="Build, validate (BalancEdit) and publish OKEDIT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
tiny_app = typer.Typer(help="The tiny flagworld VLM used by the demo and the tests.")
app.add_typer(tiny_app, name="tiny-model")
console = Console()
err_console = Console(stderr=True)

DEMO_LIMIT = 40
DEMO_OUT = Path("okedit-out/demo")


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _friendly(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        from pipeline.config import first_error

        return f"invalid {first_error(exc)}"
    return str(exc) or type(exc).__name__


def _check_writable(out: Path) -> None:
    """Create the output folder and write a probe file, so a bad --out fails up front."""
    probe = out / ".okedit-write-probe"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        _fail(f"cannot write to {out}: {exc.strerror or exc}; choose another --out")


def _run_build(cfg_kwargs: dict, plan_only: bool = False) -> dict:
    from pipeline.config import BuildConfig, resolve
    from pipeline.llm import LLMFatalError
    from pipeline.stages import ConfigError, preflight
    from pipeline.work import BuildExistsError, WorkDir

    user_errors = (BuildExistsError, ConfigError, FileNotFoundError, PermissionError, LLMFatalError)
    try:
        cfg = BuildConfig.model_validate(cfg_kwargs)
    except ValidationError as exc:
        _fail(_friendly(exc))
    if plan_only:  # nothing claimed, nothing paid
        _print_plan(cfg)
        raise typer.Exit(0)
    _check_writable(cfg.out)
    try:
        build = resolve(cfg)  # the model, editor and identity, once: a bad --model fails here
        WorkDir(cfg.out).check(build.fingerprint, build.inputs)
        preflight(build)
    except (*user_errors, ValueError) as exc:  # settings the sources or backends refuse
        _fail(_friendly(exc))
    from flows.build_okedit import run_build

    _print_plan(cfg)  # the first lines of every build, once its settings are known to work
    stopper = _Stopper(resume_command())
    with stopper.installed():
        try:
            summary = run_build(cfg)
        except BaseException as exc:
            if stopper.signalled.is_set():  # what a stop leaves: finished chunks, no report
                stopper.finish()
            if isinstance(exc, user_errors):
                _fail(_friendly(exc))
            raise
        _print_summary(summary)
        if stopper.signalled.is_set():  # the build ended before the stop caught it
            stopper.finish(0, None)
    return summary


def _print_plan(cfg) -> None:
    """The plan before any paid or long work (`pipeline.plan`); one line when none can be made."""
    from pipeline.plan import plan_for_config, render_plan

    try:  # plain markdown: a table of 9 columns wraps badly in a rich table
        console.print(render_plan(plan_for_config(cfg)), markup=False, soft_wrap=True)
    except ValueError as exc:
        console.print(f"no build plan: {exc}")


STOP_GRACE_S = 5.0  # after Ctrl-C/SIGTERM: how long requests and chunks in flight may take


def resume_command() -> str:
    """This command line, as the user can type it again (credentials in URLs redacted)."""
    from pipeline.llm import redact_text

    return redact_text(shlex.join(["okedit", *sys.argv[1:]]))


def _quiet_prefect() -> None:
    """No console logs from Prefect once the build stops (failed tasks, a closed API)."""
    for name in list(logging.root.manager.loggerDict):
        if name == "prefect" or name.startswith("prefect."):
            logging.getLogger(name).disabled = True


class _Stopper:
    """Ctrl-C (SIGINT) or SIGTERM during a build, to this process or its process group.

    The first signal stops the build: no further LLM request is sent and no further chunk
    starts (`pipeline.stages.request_stop`); requests and chunks in flight end and write
    what they finished (chunk files, the request cache). When the flow has ended, or after
    `STOP_GRACE_S` at the latest (a closed embedded API, a long chunk), the embedded Prefect
    server and any other child process are stopped and the command exits with 128 + the
    signal number and one line saying how to resume. A second signal does that at once.
    """

    def __init__(self, command: str) -> None:
        self.command = command
        self.signalled = threading.Event()
        self.signum = signal.SIGINT
        self._finishing = threading.Lock()

    @contextmanager
    def installed(self) -> Iterator[_Stopper]:
        # installed even where the shell ignores SIGINT (a background job)
        import flows.build_okedit as build_flow

        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach the main thread only (a build called from a thread)
            return
        stops = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self._handle) for sig in stops}
        build_flow.SIGTERM_HANDLER = self._handle  # Prefect's run swaps SIGTERM
        try:
            yield self
        finally:
            build_flow.SIGTERM_HANDLER = None
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signalled.is_set():
            self.finish()
        self.signum = signal.Signals(signum)
        self.signalled.set()
        from pipeline.stages import request_stop

        request_stop()
        _quiet_prefect()
        threading.Thread(target=self._deadline, name="okedit-stop", daemon=True).start()

    def _deadline(self) -> None:
        threading.Event().wait(STOP_GRACE_S)
        self.finish()

    def finish(self, code: int | None = None, line: str | None = "") -> NoReturn:
        """Stop child processes, print how to resume, exit (without waiting on Prefect's
        exit handlers, which would talk to the stopped API)."""
        self._finishing.acquire()  # a second caller waits for the first to exit
        try:
            from flows.build_okedit import stop_children

            stop_children()
        except Exception as exc:  # the exit must happen anyway
            err_console.print(f"could not stop child processes: {exc}", highlight=False)
        if line == "":
            line = (
                f"stopped ({self.signum.name}): finished chunks are kept; resume with the "
                f"same command: {self.command}"
            )
        if line:
            err_console.print(line, highlight=False, soft_wrap=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + self.signum if code is None else code)


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title="OKEDIT build")
    table.add_column("stage")
    table.add_column("ok", justify="right")
    table.add_column("rejected", justify="right")
    for stage, counts in summary["stages"].items():
        table.add_row(stage, str(counts["ok"]), str(counts["rejected"]))
    console.print(table)
    c = summary["counts"]
    line = f"{c['in']} items in = {c['published']} published + {c['rejected']} rejected"
    if c.get("deferred"):
        line += f" + {c['deferred']} deferred (transient failures: re-run to retry them)"
    console.print(line)
    paths = summary["paths"]
    console.print(f"dataset: [bold]{paths['data']}[/]")
    console.print(f"card:    [bold]{paths['card']}[/]")
    console.print(f"easyedit: {paths['easyedit']}")
    if "plot" in paths:
        console.print(f"plot:    {paths['plot']}")


# Every accepted value of the options that take one of a few, as the config's Literal types
# spell them (SourceName, ImageBackendName, EditorName, KeyVariant, EditorPreset, FilterMode,
# ...; tests/test_fail_early.py keeps the two equal). Listed in --help; a value outside them
# is refused by the config in one line.
CHOICES: dict[str, tuple[str, ...]] = {
    "source": ("flagworld", "okvqa-hub", "okvqa-files"),
    "annotator": ("offline", "llm"),
    "device": ("auto", "cpu", "cuda"),
    "editor": ("balancedit", "grace", "ft"),
    "key_variant": ("last_prompt", "reference", "question", "two_part", "two_part_last"),
    "editor_preset": ("default", "paper"),
    "filter": ("none", "unsound", "model-gap"),
    "image_backend": ("render", "openai", "diffusers", "retrieve"),
}


def one_of(option: str) -> str:
    return " | ".join(CHOICES[option])


SOURCE_HELP = f"{one_of('source')} (okvqa-hub: --okvqa-parquet or the Hub)"
ANNOTATOR_HELP = f"{one_of('annotator')} (offline: flagworld only)"
DEVICE_HELP = one_of("device")
IMAGE_BACKEND_HELP = f"{one_of('image_backend')} (render: flagworld only)"
EDITOR_HELP = one_of("editor")
KEY_HELP = (
    "routing key: last_prompt (default) | reference (the paper's) | question | two_part | "
    "two_part_last (two_part*: BalancEdit only)"
)
ALPHA_HELP = "BalancEdit's α: weight of d(k, k_pos) in the radius"
GENERATE_HELP = "also score greedy answers before/after each edit (slow on CPU)"
PRESET_HELP = (
    "default | paper: BalancEdit as its authors' code runs it (docs/usage.md); "
    "--key-variant and --alpha still override it"
)
FILTER_HELP = (
    "drop items by their check: none | unsound | model-gap (unsound and model_gap); "
    "never by the editor outcome"
)
FILTER_SCOPE_HELP = "alias of --filter unsound"


def filter_mode(item_filter: str, filter_scope: bool) -> str:
    """`--filter`, with the older `--filter-scope` meaning `--filter unsound`."""
    return "unsound" if filter_scope and item_filter == "none" else item_filter


def editor_overrides(
    editor: str, key_variant: str | None, alpha: float | None, generate: bool = True
) -> dict:
    """EditorConfig fields set on the command line (checked when the config is built)."""
    overrides: dict = {} if editor == "balancedit" else {"editor": editor}
    if not generate:
        overrides["generate_answers"] = False
    if key_variant is not None:
        overrides["key_variant"] = key_variant
    if alpha is not None:
        overrides["alpha"] = alpha
    return overrides


@app.command()
def build(
    source: Annotated[str, typer.Option(help=SOURCE_HELP)] = "flagworld",
    limit: Annotated[Optional[int], typer.Option(help="at most this many items")] = None,  # noqa: UP045
    seed: Annotated[int, typer.Option(help="sampling and generation seed")] = 0,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("okedit-out/build"),
    split: Annotated[str, typer.Option(help="OK-VQA split: val2014 | train2014")] = "val2014",
    chunk_size: Annotated[int, typer.Option(help="items per task")] = 16,
    annotator: Annotated[str, typer.Option(help=ANNOTATOR_HELP)] = "offline",
    llm_base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible URL")] = None,  # noqa: UP045
    llm_model: Annotated[str, typer.Option(help="LLM model name")] = "gpt-4o-mini",
    llm_budget_usd: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(min=0, help="stop the build's LLM requests before they cost more (USD)"),
    ] = None,
    llm_concurrency: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="LLM requests in flight, for the whole build (default 16)"),
    ] = None,
    llm_rpm: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(min=0.001, help="LLM requests per minute, for the whole build"),
    ] = None,
    validate: Annotated[bool, typer.Option(help="run the BalancEdit scope check")] = True,
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="VLM to validate with (Hub id or path; default: tiny flagworld VLM)"),
    ] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    editor: Annotated[str, typer.Option(help=EDITOR_HELP)] = "balancedit",
    key_variant: Annotated[Optional[str], typer.Option(help=KEY_HELP)] = None,  # noqa: UP045
    alpha: Annotated[Optional[float], typer.Option(help=ALPHA_HELP)] = None,  # noqa: UP045
    generate: Annotated[bool, typer.Option(help=GENERATE_HELP)] = True,
    editor_preset: Annotated[str, typer.Option(help=PRESET_HELP)] = "default",
    item_filter: Annotated[str, typer.Option("--filter", help=FILTER_HELP)] = "none",
    filter_scope: Annotated[bool, typer.Option("--filter-scope", help=FILTER_SCOPE_HELP)] = False,
    repo_id: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="then push to this Hub dataset repo (token from HF_TOKEN)"),
    ] = None,
    private: Annotated[bool, typer.Option(help="create the Hub repo private")] = False,
    okvqa_questions: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="okvqa-files: OpenEnded_mscoco_<split>_questions.json"),
    ] = None,
    okvqa_annotations: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="okvqa-files: mscoco_<split>_annotations.json"),
    ] = None,
    coco_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="okvqa-files: local COCO images (else downloaded)"),
    ] = None,
    okvqa_parquet: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="okvqa-hub: a local parquet copy of the split"),
    ] = None,
    image_base_url: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="okvqa-files: where COCO images are downloaded from"),
    ] = None,
    image_backend: Annotated[str, typer.Option(help=IMAGE_BACKEND_HELP)] = "render",
    image_pool: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="retrieve: a folder of photos to choose images from"),
    ] = None,
    image_model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="image model (openai / diffusers) or CLIP model (retrieve)"),
    ] = None,
    text_locality: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--text-locality",
            help="JSONL of image-free {question, answer} pairs (e.g. NQ-open; a line's "
            '"source": "nq" marks NQ) for EasyEdit\'s loc; default: the LLM writes one',
        ),
    ] = None,
    n_rephrases: Annotated[
        int, typer.Option(min=1, help="LLM annotator: evaluation rephrases per item")
    ] = 10,
    n_text_negatives: Annotated[
        int, typer.Option(min=0, help="LLM annotator: near-miss questions per item")
    ] = 3,
    n_votes: Annotated[
        int, typer.Option(min=1, help="LLM annotator: votes on the counterfactual type")
    ] = 3,
    prompts_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="LLM annotator: prompt templates to use instead of the shipped ones"),
    ] = None,
    validate_batch: Annotated[
        int,
        typer.Option(min=1, help="items edited and probed together (same results; GPU: 16+)"),
    ] = 1,
    config: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="a YAML or JSON file of build settings (BuildConfig fields, docs/usage.md); "
            "options that differ from their defaults override it"
        ),
    ] = None,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan", help="print the build plan (requests, images, edits, time, cost) and exit"
        ),
    ] = False,
) -> None:
    """Build OKEDIT: gather, annotate, images, QC, BalancEdit validation, local publish."""
    if limit is not None and limit < 1:
        _fail(f"--limit must be a positive number of items, got {limit}")
    options = {k: v for k, v in locals().items() if k not in ("config", "plan")}
    settings = build_settings(**options)
    if config is not None:  # the file, with what the command line changes on top
        defaults = {
            name: param.default
            for name, param in inspect.signature(build).parameters.items()
            if name in options
        }
        settings = merged(read_config_file(config), changed(settings, build_settings(**defaults)))
    _run_build(settings, plan_only=plan)


def build_settings(
    *,
    source: str,
    limit: int | None,
    seed: int,
    out: Path,
    split: str,
    chunk_size: int,
    annotator: str,
    llm_base_url: str | None,
    llm_model: str,
    llm_budget_usd: float | None,
    llm_concurrency: int | None,
    llm_rpm: float | None,
    validate: bool,
    model: str | None,
    device: str,
    editor: str,
    key_variant: str | None,
    alpha: float | None,
    generate: bool,
    editor_preset: str,
    item_filter: str,
    filter_scope: bool,
    repo_id: str | None,
    private: bool,
    okvqa_questions: Path | None,
    okvqa_annotations: Path | None,
    coco_dir: Path | None,
    okvqa_parquet: Path | None,
    image_base_url: str | None,
    image_backend: str,
    image_pool: Path | None,
    image_model: str | None,
    text_locality: Path | None,
    n_rephrases: int,
    n_text_negatives: int,
    n_votes: int,
    prompts_dir: Path | None,
    validate_batch: int,
) -> dict:
    """`BuildConfig` fields from `okedit build`'s options (checked when the config is built)."""
    validation: dict = {
        "enabled": validate,
        "device": device,
        "filter": filter_mode(item_filter, filter_scope),
        "editor": editor_overrides(editor, key_variant, alpha, generate),
        "editor_preset": editor_preset,
        "batch_items": validate_batch,
    }
    if model:
        validation["model"] = model
    source_files = {
        "questions_file": okvqa_questions,
        "annotations_file": okvqa_annotations,
        "coco_dir": coco_dir,
        "parquet": okvqa_parquet,
        "image_base_url": image_base_url,
    }
    images = {"backend": image_backend, "pool_dir": image_pool, "model": image_model}
    llm_limits = {"budget_usd": llm_budget_usd, "requests_per_minute": llm_rpm}
    return {
        "source": {
            "name": source,
            "split": split,
            **{k: v for k, v in source_files.items() if v is not None},
        },
        "images": {k: v for k, v in images.items() if v is not None},
        "limit": limit,
        "seed": seed,
        "out": out,
        "chunk_size": chunk_size,
        "annotator": {
            "kind": annotator,
            "llm_base_url": llm_base_url,
            "llm_model": llm_model,
            **({"concurrency": llm_concurrency} if llm_concurrency else {}),
            "llm": {k: v for k, v in llm_limits.items() if v is not None},
            **({"text_locality_file": text_locality} if text_locality else {}),
            "n_rephrases": n_rephrases,
            "n_text_negatives": n_text_negatives,
            "n_votes": n_votes,
            **({"prompts_dir": prompts_dir} if prompts_dir else {}),
        },
        "validation": validation,
        "publish": {"repo_id": repo_id, "private": private},
    }


def read_config_file(path: Path) -> dict:
    """A build config file: YAML or JSON with `BuildConfig` fields (docs/usage.md)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        _fail(f"cannot read --config {path}: {exc.strerror or exc}")
    except yaml.YAMLError as exc:
        _fail(f"--config {path} is not YAML or JSON: {str(exc).splitlines()[0]}")
    if not isinstance(data, dict):
        _fail(f"--config {path} must hold a mapping of build settings, not {type(data).__name__}")
    return data


def changed(given: dict, defaults: dict) -> dict:
    """The settings of `given` that differ from `defaults` (nested)."""
    out = {}
    for key, value in given.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            inner = changed(value, default)
            if inner:
                out[key] = inner
        elif value != default:
            out[key] = value
    return out


def merged(base: dict, top: dict) -> dict:
    """`base` with `top`'s settings on top (nested)."""
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        both = isinstance(value, dict) and isinstance(below, dict)
        out[key] = merged(below, value) if both else value
    return out


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="output folder")] = DEMO_OUT,
    limit: Annotated[int, typer.Option(help="items")] = DEMO_LIMIT,
) -> None:
    """The embedded default: flagworld, offline annotator, tiny VLM, BalancEdit, local publish."""
    if limit < 1:
        _fail(f"--limit must be a positive number of items, got {limit}")
    _run_build({"limit": limit, "out": out})


@app.command("validate")
def validate_cmd(
    dataset: Annotated[Path, typer.Argument(help="a published okedit folder (with data/)")],
    model: Annotated[Optional[str], typer.Option(help="VLM (Hub id or path)")] = None,  # noqa: UP045
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    editor: Annotated[str, typer.Option(help=EDITOR_HELP)] = "balancedit",
    key_variant: Annotated[Optional[str], typer.Option(help=KEY_HELP)] = None,  # noqa: UP045
    alpha: Annotated[Optional[float], typer.Option(help=ALPHA_HELP)] = None,  # noqa: UP045
    generate: Annotated[bool, typer.Option(help=GENERATE_HELP)] = True,
    editor_preset: Annotated[str, typer.Option(help=PRESET_HELP)] = "default",
    item_filter: Annotated[str, typer.Option("--filter", help=FILTER_HELP)] = "none",
    filter_scope: Annotated[bool, typer.Option("--filter-scope", help=FILTER_SCOPE_HELP)] = False,
    validate_batch: Annotated[
        int, typer.Option(min=1, help="items edited and probed together (same results)")
    ] = 1,
    out: Annotated[Optional[Path], typer.Option(help="write here (default: in place)")] = None,  # noqa: UP045
) -> None:
    """Re-validate an existing dataset folder with BalancEdit and refresh its card."""
    from pipeline.revalidate import revalidate_folder

    overrides = editor_overrides(editor, key_variant, alpha, generate)
    try:
        summary = revalidate_folder(
            dataset,
            out or dataset,
            model,
            device,
            filter_mode=filter_mode(item_filter, filter_scope),
            editor=overrides,
            editor_preset=editor_preset,
            batch_items=validate_batch,
        )
    except (FileNotFoundError, ValueError) as exc:
        _fail(_friendly(exc))
    _print_summary(summary)


@app.command()
def publish(
    folder: Annotated[Path, typer.Argument(help="a built okedit folder")],
    repo_id: Annotated[str, typer.Option(help="Hub dataset repo, e.g. me/okedit")],
    private: Annotated[bool, typer.Option(help="create the repo private")] = False,
    revision: Annotated[Optional[str], typer.Option(help="branch to push to")] = None,  # noqa: UP045
    commit_message: Annotated[str, typer.Option()] = "Upload OKEDIT build",
) -> None:
    """Push a built folder to the Hugging Face Hub (token from HF_TOKEN) and verify it."""
    from pipeline.publish import HubPublishError, push_to_hub

    try:
        result = push_to_hub(
            folder, repo_id, private=private, revision=revision, commit_message=commit_message
        )
    except (HubPublishError, OSError) as exc:
        _fail(_friendly(exc))
    except Exception as exc:  # the Hub client's own errors: auth, network, quota
        _fail(f"push to {repo_id} failed: {type(exc).__name__}: {exc}")
    console.print(
        f"pushed {result['files']} files, {result['rows']} rows: [bold]{result['commit_url']}[/]"
    )


@app.command()
def serve(
    cron: Annotated[Optional[str], typer.Option(help="schedule, e.g. '0 3 * * 1'")] = None,  # noqa: UP045
    interval_s: Annotated[Optional[int], typer.Option(help="or: every N seconds")] = None,  # noqa: UP045
    no_schedule: Annotated[bool, typer.Option(help="manual runs only")] = False,
    limit: Annotated[Optional[int], typer.Option(help="default --limit of runs")] = None,  # noqa: UP045
    out_root: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="root of versions of runs (default $OKEDIT_HOME/okedit-builds)"),
    ] = None,
    out: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="or: one output folder of runs (resumes; other builds refused)"),
    ] = None,
    repo_id: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="push each run's dataset to this Hub repo (HF_TOKEN)"),
    ] = None,
    crash_after_s: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="a run without heartbeat this long is marked Crashed (default 180)"),
    ] = None,
) -> None:
    """Serve the build-okedit deployment (needs PREFECT_API_URL of a running server)."""
    from flows.serve import serve as serve_deployment

    defaults = {"limit": limit, "out_root": out_root, "out": out, "repo_id": repo_id}
    parameters = {k: v for k, v in defaults.items() if v is not None}
    serve_deployment(
        cron=cron,
        interval_s=interval_s,
        parameters=parameters,
        no_schedule=no_schedule,
        crash_after_s=crash_after_s,
    )


@tiny_app.command("train")
def tiny_train(
    out: Annotated[Optional[Path], typer.Option(help="where to save")] = None,  # noqa: UP045
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[Optional[int], typer.Option(help="training steps")] = None,  # noqa: UP045
    budget_s: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="stop early after this many seconds (safety net)"),
    ] = None,
) -> None:
    """Train the tiny flagworld VLM (CPU, 3000 steps: about 15 minutes) and report its accuracy."""
    from pipeline.tiny_model import default_model_dir, train_flagworld_vlm

    options = {"steps": steps} if steps else {}
    metrics = train_flagworld_vlm(
        out or default_model_dir(), seed=seed, budget_s=budget_s, **options
    )
    console.print_json(data=metrics)


def main() -> None:  # pragma: no cover - console entry
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted; re-run the same command to resume")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
