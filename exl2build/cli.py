"""`exl2build build|plan|report|gc|clean|eval|generate|chat`.

build/plan/report compose the recipe with Hydra (recipes/NAME.yaml as the primary config,
conf/ on the search path, Hydra's override grammar, `--cfg job`, `-m` multirun), validate
it (config.py), turn it into steps (dag/graph.py) and plan or run them (dag/runner.py).
User errors print one paragraph, no stack trace, and exit with the error's code (2 for
configuration errors).
"""

from __future__ import annotations

import difflib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from exl2build.errors import ConfigError, Exl2BuildError

USAGE = """usage: exl2build COMMAND [recipe=NAME|PATH] [key=value ...]

  build   [recipe=demo] [overrides] [-m] [--cfg job]  build what is missing, write the report
  plan    [recipe=demo] [overrides]   print each step: cache key, cached or run + why
  report  [recipe=demo] [overrides]   rewrite <out_dir>/report.* from cached results
  gc | clean [cache_dir=.exl2cache] [--dry-run] [--all]
                                      remove cache entries no build output references
  eval     model=DIR [eval overrides]           evaluate any model folder
  generate model=DIR prompt="..." [max_new_tokens=256] [temperature= top_p= top_k= seed=]
  chat     model=DIR [system="..."] [temperature= top_p= top_k=]
                                      sampling not given: the model's generation_config.json

Overrides use Hydra's grammar: quant.bpws=[2.5,3.0] quant.head_bits=8 source.path=/m
calib.path=cal.parquet out_dir=builds/x cache_dir=/cache runner=ray eval=off ...
-m quant.bpws=[3.0],[4.0] runs one job per value (they share the measurement).
"""

HYDRA_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--info", "--config-name", "-cn", "--config-dir", "-cd")
GROUPS = ("source", "calib", "quant", "eval", "runner")

_exit_codes: list[int] = []


def _err(message: str) -> None:
    print(f"exl2build: {message}", file=sys.stderr)


# ---------------------------------------------------------------- recipe location and overrides


def locate_recipe(recipe: str) -> Path:
    from exl2build.resources import recipes_dir

    given = Path(recipe)
    if given.suffix in (".yaml", ".yml") or os.sep in recipe:
        if given.is_file():
            return given.resolve()
        raise ConfigError(f"Config error at `recipe`: the file {recipe!r} does not exist. Fix: give recipe=NAME of recipes/NAME.yaml or a path to a YAML recipe.")
    path = recipes_dir() / f"{recipe}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.yaml")))
        raise ConfigError(f"Config error at `recipe`: there is no recipe named {recipe!r}. Fix: use one of {names}, or a path to a YAML file.")
    return path


def check_recipe_yaml(path: Path) -> None:
    """A recipe that is not YAML would surface as a parser stack trace inside Hydra."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"Config error in recipe {path}: not valid YAML{at} ({getattr(exc, 'problem', exc)}). Fix: correct the YAML syntax there.") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"Config error in recipe {path}: the file holds a {type(data).__name__}, not a mapping of settings. Fix: write `key: value` lines (see recipes/demo.yaml).")


def check_overrides(overrides: list[str]) -> list[str]:
    """Reject unknown keys and group options before Hydra sees them, naming the fix.

    Returns the overrides to hand to Hydra: a setting of the schema that the recipe file
    leaves out (e.g. `device`) is still a valid setting, so plain `key=value` becomes
    `++key=value` (set, adding it if absent)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from exl2build.config import known_keys, schema_has
    from exl2build.resources import conf_dir

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"Config error in the overrides: {str(exc).splitlines()[0]}. Fix: write key=value in Hydra's grammar, e.g. quant.bpws=[2.5,3.0].") from None
    out = []
    for text, o in zip(overrides, parsed):
        out.append(text)
        key = o.key_or_group
        if key.startswith("hydra") or key in ("recipe",):
            continue
        if key in GROUPS and "." not in key and not o.is_sweep_override() and isinstance(o.value(), str):
            options = sorted(p.stem for p in (conf_dir() / key).glob("*.yaml"))
            if o.value() not in options:
                raise ConfigError(f"Config error at `{key}`: {o.value()!r} is not a {key} configuration. Fix: use one of {', '.join(options)} (conf/{key}/), or set single keys like {key}.KEY=VALUE.")
            continue
        if key in GROUPS:
            continue
        if not schema_has(key):
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            known = known_keys(parent)
            hint = f"known keys{' under ' + parent if parent else ''}: {', '.join(known)}" if known else "check the spelling"
            close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
            if close:
                hint = f"did you mean `{parent + '.' if parent else ''}{close[0]}`? ({hint})"
            raise ConfigError(f"Config error at `{key}`: unknown setting. Fix: {hint}.")
        if o.type.name == "CHANGE" and not o.is_sweep_override() and o.package is None:
            out[-1] = "++" + text
    return out


def split_args(args: list[str]) -> tuple[Optional[str], list[str], list[str]]:
    """-> (recipe, overrides, hydra flags)."""
    recipe, overrides, flags = None, [], []
    it = iter(args)
    for a in it:
        if a.startswith("recipe="):
            recipe = a.split("=", 1)[1]
        elif a.startswith("-"):
            flags.append(a)
            if a in HYDRA_FLAGS_WITH_VALUE:
                flags.append(next(it, ""))
        else:
            overrides.append(a)
    return recipe, overrides, flags


# ---------------------------------------------------------------- build / plan / report


def _run_job(command: str, cfg_dict: dict, recipe_path: str, log_dir: Optional[str]) -> int:
    from exl2build.config import load_recipe
    from exl2build.dag.cache import Cache
    from exl2build.dag.graph import build_graph
    from exl2build.dag.runner import Runner, succeeded, summary

    recipe = load_recipe(cfg_dict)
    steps = build_graph(recipe, recipe_path)
    device = recipe.device
    if recipe.runner.kind == "local" and len(recipe.runner.gpus) == 1 and device == "auto":
        device = f"cuda:{recipe.runner.gpus[0]}"
    runner = Runner(Cache(Path(recipe.cache_dir)), recipe.out_dir, device=device, log_dir=log_dir)

    if command == "plan":
        lines = runner.plan(steps)
        print(f"plan for recipe {recipe.name}: cache {recipe.cache_dir}, outputs {recipe.out_dir}")
        for line in lines:
            print(f"  {line}")
        todo = sum(line.action == "run" for line in lines if line.name != "report")
        print(f"{todo} step(s) to run, {sum(line.action == 'cached' for line in lines)} cached")
        return 0

    from exl2build.dag.executors import LocalExecutor, make_executor
    from exl2build.dag.progress import Display

    with Display(len(steps)) as display:
        if command == "report":
            results = runner.run(steps, LocalExecutor(), display, only_cached=True)
        else:
            executor = make_executor(recipe.runner.kind, recipe.runner.gpus, recipe.runner.address, display.step_progress)
            try:
                results = runner.run(steps, executor, display)
            finally:
                executor.close()
    print(summary(results))
    report = Path(recipe.out_dir) / "report.md"
    if report.is_file():
        print(f"report: {report}")
    if log_dir:
        print(f"logs: {log_dir}")
    return 0 if succeeded(results) else 1


def _hydra_command(command: str, args: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from exl2build.resources import conf_dir

    recipe, overrides, flags = split_args(args)
    recipe_path = locate_recipe(recipe or "demo")
    check_recipe_yaml(recipe_path)
    overrides = check_overrides(overrides)

    tmp_run_dir = None
    hydra_overrides = [
        f"hydra.searchpath=['file://{conf_dir()}']",
        "hydra.output_subdir=null",
        f"hydra.job.name={command}",
        "hydra.job.chdir=false",
        "hydra.sweep.dir=${oc.select:out_dir,builds}/logs/${now:%Y-%m-%d_%H-%M-%S}-multirun",
        "hydra.sweep.subdir=${hydra.job.num}",
    ]
    if command == "plan":  # plans write nothing: their run folder is thrown away
        tmp_run_dir = tempfile.mkdtemp(prefix="exl2build-plan-")
        hydra_overrides += [f"hydra.run.dir={tmp_run_dir}", f"hydra.sweep.dir={tmp_run_dir}", "hydra/job_logging=disabled"]
    else:
        hydra_overrides += ["hydra.run.dir=${oc.select:out_dir,builds}/logs/${now:%Y-%m-%d_%H-%M-%S}-" + command, "hydra/job_logging=exl2build"]

    def task(cfg) -> None:
        try:
            data = OmegaConf.to_container(cfg, resolve=True)
            log_dir = None if command == "plan" else HydraConfig.get().runtime.output_dir
            _exit_codes.append(_run_job(command, data, str(recipe_path), log_dir))
        except Exl2BuildError as exc:
            _err(str(exc))
            _exit_codes.append(exc.exit_code)

    main = hydra.main(version_base=None, config_path=str(recipe_path.parent), config_name=recipe_path.stem)(task)
    saved = sys.argv
    sys.argv = [f"exl2build {command}"] + flags + hydra_overrides + overrides
    try:
        main()
    except SystemExit as exc:
        # Hydra reports its own composition errors (a bad recipe file, a missing group
        # option in a defaults list) and exits 1 before our task runs: a config error.
        if exc.code not in (0, None) and not _exit_codes:
            return 2
        raise
    finally:
        sys.argv = saved
        if tmp_run_dir:
            shutil.rmtree(tmp_run_dir, ignore_errors=True)
    return max(_exit_codes, default=0)


# ---------------------------------------------------------------- gc / clean


def _gc_command(command: str, args: list[str]) -> int:
    from exl2build.dag.cache import Cache

    cache_dir, dry, wipe = ".exl2cache", False, False
    for a in args:
        if a.startswith("cache_dir="):
            cache_dir = a.split("=", 1)[1]
        elif a in ("--dry-run", "-n"):
            dry = True
        elif a == "--all" and command == "clean":
            wipe = True
        else:
            raise ConfigError(f"Config error at `{a}`: `exl2build {command}` takes cache_dir=PATH, --dry-run" + (" and --all" if command == "clean" else "") + ". Fix: remove it.")
    if not Path(cache_dir).is_dir():
        print(f"no cache at {cache_dir}: nothing to remove")
        return 0
    cache = Cache(Path(cache_dir))
    doomed = [p for p in Path(cache_dir).iterdir() if p.name != "digests.json"] if wipe else cache.garbage()
    total = 0
    for p in doomed:
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        total += size
        print(f"{'would remove' if dry else 'remove'} {p.relative_to(cache_dir)} ({size / 1e6:.1f} MB)")
    if not dry:
        if wipe:
            for p in doomed:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        else:
            cache.remove(doomed)
    print(f"{'would free' if dry else 'freed'} {total / 1e6:.1f} MB in {len(doomed)} entr{'y' if len(doomed) == 1 else 'ies'}")
    return 0


# ---------------------------------------------------------------- eval / generate / chat


def _kv(args: list[str]) -> tuple[dict, list[str]]:
    """model=DIR prompt=... -> ({model, prompt, ...}, the rest as overrides)."""
    known, rest = {}, []
    for a in args:
        key = a.split("=", 1)[0]
        if "=" in a and key in ("model", "prompt", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "device", "system"):
            known[key] = a.split("=", 1)[1]
        else:
            rest.append(a)
    return known, rest


# Numeric settings of generate/chat: key -> (parser, what it must be, an example value).
_GENERATION_NUMBERS = {
    "max_new_tokens": (int, "an integer", "256"),
    "seed": (int, "an integer", "256"),
    "temperature": (float, "a number", "0.7"),
    "top_p": (float, "a number", "0.7"),
    "top_k": (int, "an integer", "40"),
}


def _eval_command(command: str, args: list[str]) -> int:
    from exl2build.steps.common import call

    try:
        from exl2build.eval import commands
    except ImportError as exc:
        _err(f"`exl2build {command}` needs exl2build.eval.commands, which is not available ({exc}).")
        return 1
    known, rest = _kv(args)
    model = known.pop("model", None)
    if not model:
        raise ConfigError(f"Config error at `model`: `exl2build {command}` needs the model folder. Fix: add model=/path/to/model.")
    if command == "eval":
        return int(commands.run_eval(model, rest + [f"{k}={v}" for k, v in known.items()]) or 0)
    if rest:
        raise ConfigError(f"Config error at `{rest[0]}`: not a setting of `exl2build {command}`. Fix: use prompt=, max_new_tokens=, temperature=, top_p=, top_k=, seed=, device=.")
    for k, (kind, what, example) in _GENERATION_NUMBERS.items():
        if k in known:
            try:
                known[k] = kind(known[k])
            except ValueError:
                raise ConfigError(f"Config error at `{k}`: {known[k]!r} is not {what}. Fix: e.g. {k}={example}.") from None
    if command == "generate":
        prompt = known.pop("prompt", None)
        if prompt is None:
            raise ConfigError('Config error at `prompt`: nothing to continue. Fix: add prompt="I have a dream".')
        return int(call(commands.run_generate, model, prompt, known.pop("max_new_tokens", 256), **known) or 0)
    return int(call(commands.run_chat, model, **known) or 0)


# ---------------------------------------------------------------- entry point


def main(argv: Optional[list[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0)
    command, rest = args[0], args[1:]
    _exit_codes.clear()
    try:
        if command in ("build", "plan", "report"):
            code = _hydra_command(command, rest)
        elif command in ("gc", "clean"):
            code = _gc_command(command, rest)
        elif command in ("eval", "generate", "chat"):
            code = _eval_command(command, rest)
        else:
            _err(f"unknown command {command!r}.\n{USAGE}")
            code = 2
    except Exl2BuildError as exc:
        _err(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        _err("interrupted; finished steps stay cached and unfinished layers resume on the next run")
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
