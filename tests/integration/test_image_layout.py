"""The image's /workspace rebuilt without a Docker engine, and stages run there under DVC.

In the image, ``pilamim`` is a wheel installed in /opt/venv, and /workspace holds only what the
runtime stage's COPY and RUN lines put there. A ``dvc.yaml`` dep that no line provides is
missing there and nowhere else: every checkout has it, so no other test notices, while in the
container the flow's ``dvc commit`` fails right after the stage ran and nothing is recorded.
Reading the Dockerfile's text (test_docker_files.py) cannot see that; CI has no Docker engine.

So this module follows the Dockerfile instead of restating it. It replays the builder's COPY
lines (through the Dockerfile's dockerignore allow-list) and builds the wheel from them,
installs the wheel non-editable into a clean venv (the image's /opt/venv; the third-party
packages come from this checkout's venv through a ``.pth`` file, so nothing is downloaded),
replays the runtime stage's COPY lines and the RUN lines after its WORKDIR into a temp
workspace, then runs ``fetch`` the way the Prefect worker does (the flow's task,
``pilamim_flows.pipeline.reproduce``) and ``prepare`` the way ``dvc repro`` does. Dropping a
COPY or RUN line the pipeline needs makes it fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile before the context's own.
DOCKERIGNORE = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
IMAGES_PER_CLASS = 8  # enough for prepare to give every class a val and a test image
TIMEOUT_S = 300

# Every test here shares one image (the wheel, the venv, the workspace): one xdist worker.
pytestmark = pytest.mark.xdist_group("image_layout")


# -- reading the Dockerfile --------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, COPY, RUN, ...
    args: str


def read_instructions(path: Path) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined as Docker joins them (comment
    lines inside a continued instruction are dropped). Heredocs are not supported: the test
    fails on one rather than misreading it."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, args = pending.strip().partition(" ")
        assert "<<" not in args or keyword.upper() != "RUN", f"heredoc in {pending!r}"
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return instructions


def read_stages(instructions: list[Instruction]) -> dict[str, list[Instruction]]:
    """Stage name (``AS name``) -> its instructions, FROM first."""
    stages: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else str(len(stages))
            current = stages[name] = []
        if current is not None:
            current.append(instruction)
    return stages


def lineage(stages: dict[str, list[Instruction]], name: str) -> list[Instruction]:
    """A stage's instructions preceded by those of the stages it is built FROM (SHELL and ENV
    are inherited)."""
    instructions = stages[name]
    parent = instructions[0].args.split()[0]
    return (lineage(stages, parent) if parent in stages else []) + instructions


def shell_of(instructions: list[Instruction]) -> list[str]:
    """The shell RUN lines run with: the last SHELL instruction, else Docker's default."""
    shells = [json.loads(i.args) for i in instructions if i.keyword == "SHELL"]
    return shells[-1] if shells else ["/bin/sh", "-c"]


def parse_copy(args: str) -> tuple[dict[str, str], list[str], str]:
    """``COPY [--flag=value ...] SRC... DEST`` -> (flags, sources, dest). The JSON form is not
    used in our Dockerfile and not supported here."""
    assert not args.startswith("["), f"COPY in JSON form: {args}"
    words = args.split()
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def runs_after_workdir(stage: list[Instruction]) -> list[str]:
    """The RUN lines after the stage's last WORKDIR: the ones that act on the workspace (the
    ones before it set up users and system folders, which a temp folder needs no help with)."""
    last = max(i for i, ins in enumerate(stage) if ins.keyword == "WORKDIR")
    return [ins.args for ins in stage[last:] if ins.keyword == "RUN"]


# -- the build context -------------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern:
    """A dockerignore pattern as a regex on slash-separated context paths (Go's
    filepath.Match plus ``**``)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def read_dockerignore(path: Path) -> list[tuple[bool, re.Pattern]]:
    """(is_exception, pattern) per rule, in file order."""
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            exception = line.startswith("!")
            pattern = line.lstrip("!").strip().strip("/")
            rules.append((exception, _glob_regex(pattern)))
    return rules


def in_context(rel: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether the file at context path ``rel`` reaches the build: the last rule that matches
    the path or one of its parent folders decides, as in Docker."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for exception, pattern in rules:
        if any(pattern.fullmatch(c) for c in candidates):
            included = exception
    return included


def context_files(source: str, rules: list[tuple[bool, re.Pattern]]) -> list[Path]:
    """The files under context path ``source`` (a file or a folder) that reach the build."""
    top = ROOT / source
    files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
    return [p for p in files if in_context(p.relative_to(ROOT).as_posix(), rules)]


# -- replaying a stage -------------------------------------------------------------------------


def container_path(root: Path, workdir: str, path: str) -> Path:
    """Where container path ``path`` (absolute, or relative to ``workdir``) lies under ``root``."""
    return root / os.path.join(workdir, path).lstrip("/")


def replay_copies(stage: list[Instruction], root: Path,
                  rules: list[tuple[bool, re.Pattern]]) -> Path:
    """Replay the stage's WORKDIR lines and its COPY lines from the build context under
    ``root`` (the container's /); return the last WORKDIR. ``COPY --from`` lines are left to
    the caller. Docker's rules: a folder source copies its contents into DEST; a file goes to
    DEST/name when DEST ends in / or there are several sources, else to DEST."""
    workdir = "/"
    for instruction in stage:
        if instruction.keyword == "WORKDIR":
            workdir = os.path.join(workdir, instruction.args)
            container_path(root, workdir, ".").mkdir(parents=True, exist_ok=True)
        if instruction.keyword != "COPY":
            continue
        flags, sources, dest = parse_copy(instruction.args)
        if "from" in flags:
            continue
        target = container_path(root, workdir, dest)
        into = dest.endswith("/") or len(sources) > 1
        for source in sources:
            files = context_files(source, rules)
            assert files, f"COPY {source}: nothing of it reaches the build context"
            base = ROOT / source
            for file in files:
                if base.is_dir():
                    out = target / file.relative_to(base)
                else:
                    out = target / file.name if into else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, out)
    return container_path(root, workdir, ".")


# -- the wheel and the venv --------------------------------------------------------------------


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> \
        subprocess.CompletedProcess:
    """Run ``cmd``; on failure, fail the test with its output."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                    f"{done.stderr[-5000:]}")
    return done


def build_wheel(src: Path, out: Path) -> Path:
    """The wheel of the sources the builder stage copies. No build isolation: setuptools comes
    from this venv, so the build needs no network."""
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--wheel-dir", str(out), str(src)], cwd=src)
    (wheel,) = out.glob("pilamim-*.whl")
    return wheel


def clean_venv(venv: Path, wheel: Path) -> Path:
    """A venv holding the wheel, installed non-editable, and a ``dvc`` command; return its
    site-packages. Third-party packages are borrowed from this venv by a ``.pth`` line: a plain
    path line does not run that folder's own ``.pth`` files, so this checkout's editable
    ``pilamim`` finder stays out, and the venv's own site-packages comes first anyway."""
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip",
         str(venv)], cwd=venv.parent)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-I", "-c",
                     "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    cwd=venv).stdout.strip())
    (site / "borrowed_third_party.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)], cwd=venv)
    dvc = venv / "bin" / "dvc"
    dvc.write_text(f'#!/bin/sh\nexec "{python}" -m dvc "$@"\n')
    dvc.chmod(0o755)
    return site


def container_env(venv: Path, home: Path) -> dict[str, str]:
    """A container's environment: nothing inherited from the test run but system PATH
    entries, the venv first (as ENV PATH=/opt/venv/bin:$PATH), no DVC or git settings from
    this machine, MLflow in a SQLite file outside the workspace."""
    system_path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                   if not p.startswith(str(ROOT))]
    return {"PATH": os.pathsep.join([str(venv / "bin"), *system_path]),
            "HOME": str(home), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            "MPLCONFIGDIR": str(home / "mpl"), "PREFECT_HOME": str(home / "prefect"),
            "DVC_NO_ANALYTICS": "1", "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"),
            "DVC_SYSTEM_CONFIG_DIR": str(home / "dvc-system"), "GIT_CONFIG_NOSYSTEM": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}


def replay_runs(stage: list[Instruction], shell: list[str], workspace: Path,
                env: dict[str, str]) -> None:
    """Run the RUN lines after the stage's WORKDIR in ``workspace``, in order, with its shell."""
    commands = runs_after_workdir(stage)
    assert commands, "the runtime stage runs nothing in its workspace (no dvc init?)"
    for command in commands:
        run([*shell, command], cwd=workspace, env=env)


# -- the image ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    workspace: Path
    site_packages: Path
    env: dict[str, str]
    python: Path

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the workspace, as `docker run` would there."""
        return run(list(cmd), cwd=self.workspace, env=self.env)

    def dvc_json(self, *args: str):
        return json.loads(self.run("dvc", *args, "--json").stdout)


def make_images(folder: Path) -> Path:
    """A few bundled Fashion-MNIST images per class as ``<class>/<n>.png``: a data source small
    enough that DVC hashes and caches it in a blink."""
    import numpy as np

    from pilamim.data.embedded import SUBSET_PATH
    from pilamim.data.sources import encode_gray_png

    with np.load(SUBSET_PATH) as z:
        classes, images, labels = list(z["classes"]), z["train_images"], z["train_labels"]
    for index, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for n, i in enumerate(np.flatnonzero(labels == index)[:IMAGES_PER_CLASS]):
            (folder / name / f"{n:03d}.png").write_bytes(encode_gray_png(images[i]))
    return folder


def point_data_at(workspace: Path, images: Path) -> None:
    """Edit the image's params/data.yaml, as a user would, to read ``images``."""
    path = workspace / "params" / "data.yaml"
    data = yaml.safe_load(path.read_text())
    data["source"] = str(images)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def build_image(tmp: Path) -> Image:
    """The builder's wheel in a clean venv, the runtime's workspace laid out from the
    Dockerfile, its RUN lines replayed there."""
    stages = read_stages(read_instructions(DOCKERFILE))
    rules = read_dockerignore(DOCKERIGNORE)
    src = replay_copies(stages["builder"], tmp / "builder", rules)
    site = clean_venv(tmp / "venv", build_wheel(src, tmp / "wheel"))
    final = list(stages)[-1]  # what `docker build` without --target produces
    runtime = stages[final]
    assert any(i.keyword == "COPY" and parse_copy(i.args)[1:] == (["/opt/venv"], "/opt/venv")
               for i in runtime), "the runtime no longer takes /opt/venv from the builder"
    home = tmp / "home"
    home.mkdir()
    env = container_env(tmp / "venv", home)
    workspace = replay_copies(runtime, tmp / "runtime", rules)
    replay_runs(runtime, shell_of(lineage(stages, final)), workspace, env)
    return Image(workspace, site, env, tmp / "venv" / "bin" / "python")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Image:
    return build_image(tmp_path_factory.mktemp("image"))


def code_deps() -> list[str]:
    """Every dep ``dvc.yaml`` lists inside the package: the stages' code and bundled data."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return sorted({d for s in stages.values() for d in s.get("deps", [])
                   if d.startswith("pilamim/")})


# -- tests -------------------------------------------------------------------------------------


def test_build_context_carries_the_sources_and_no_data_venv_git_or_secrets():
    """The allow-list lets through every file a COPY line names, and nothing heavy or secret."""
    rules = read_dockerignore(DOCKERIGNORE)
    stages = read_stages(read_instructions(DOCKERFILE))
    for stage in stages.values():
        for instruction in stage:
            if instruction.keyword == "COPY" and "from" not in parse_copy(instruction.args)[0]:
                for source in parse_copy(instruction.args)[1]:
                    assert context_files(source, rules), f"{source} is not in the build context"
    for path in (".git/HEAD", ".venv/pyvenv.cfg", "data/raw/x.png", "models/pretrain/x",
                 "mlruns/0/meta.yaml", "mlflow.db", "docker/.env", "tests/conftest.py",
                 "pilamim/__pycache__/cli.cpython-311.pyc", "pilamim/stages/x.pyc",
                 "flows/.pytest_cache/v"):
        assert not in_context(path, rules), f"{path} would be sent to the Docker build"
    for path in ("pilamim/cli.py", "pilamim/data/embedded/fashion_mnist_subset.npz",
                 "flows/pipeline.py", "params/data.yaml", "dvc.yaml", "pyproject.toml"):
        assert in_context(path, rules), f"{path} is left out of the Docker build"


@pytest.mark.slow
def test_the_package_comes_from_the_wheel_not_this_checkout(image):
    """Isolated mode (no working directory on sys.path): what the `pilamim` command imports."""
    done = image.run(str(image.python), "-I", "-c",
                     "import pilamim, pilamim_flows; print(pilamim.__file__); "
                     "print(pilamim_flows.__file__)")
    for file in done.stdout.split():
        assert Path(file).is_relative_to(image.site_packages), file
        assert not Path(file).resolve().is_relative_to(ROOT), file


@pytest.mark.slow
def test_every_code_dep_in_the_workspace_is_the_installed_code(image):
    """What DVC hashes for a stage is byte for byte what the stage runs."""
    deps = code_deps()
    assert "pilamim/cli.py" in deps
    for dep in deps:
        in_workspace = image.workspace / dep
        assert in_workspace.is_file(), f"dvc.yaml dep {dep} is missing from /workspace"
        assert in_workspace.read_bytes() == (image.site_packages / dep).read_bytes(), (
            f"/workspace/{dep} differs from the installed package's")


@pytest.mark.slow
def test_a_stage_run_in_the_image_is_recorded_by_dvc_and_then_up_to_date(image, tmp_path):
    """fetch the way the Prefect worker runs it (the flow's task: DVC reproduces the stage and
    records it), then prepare through `dvc repro`; both end up in dvc.lock and DVC finds
    nothing to do."""
    point_data_at(image.workspace, make_images(tmp_path / "images"))
    task = ("from pilamim_flows.pipeline import reproduce; "
            "print(reproduce('fetch', 'params', False, {}))")
    assert image.run(str(image.python), "-c", task).stdout.split()[-1] == "True"  # it ran
    assert image.run(str(image.python), "-c", task).stdout.split()[-1] == "False"  # up to date

    repro = image.run("dvc", "repro", "prepare")
    assert "'fetch' didn't change" in repro.stdout, repro.stdout  # the flow's record counts

    lock = yaml.safe_load((image.workspace / "dvc.lock").read_text())["stages"]
    assert {"fetch", "prepare"} <= set(lock)
    recorded = {d["path"]: d["md5"] for d in lock["fetch"]["deps"]}
    cli = hashlib.md5((image.site_packages / "pilamim" / "cli.py").read_bytes()).hexdigest()
    assert recorded["pilamim/cli.py"] == cli  # DVC hashed the code that ran
    assert image.dvc_json("status", "fetch", "prepare") == {}

