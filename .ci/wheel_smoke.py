"""The installed wheel, used as a new user would: run by ``.ci/wheel`` with the Python of a fresh
virtual environment that holds the wheel (not editable), from a folder outside the checkout.

    python wheel_smoke.py WHEEL README

(The checks after the build run in a second process, as a user's next program would: a process
settles at import whether the extension loads without compiling.)

Checks, each printed as it passes: the wheel's file list; the import comes from site-packages;
``python -m mgc_kernels.env`` is silent on stderr and reports the native backend unbuilt, with
``auto`` on the reference; ``--build-native`` builds it from the installed sources; then ``auto``
picks it on CPU, the README's training step runs with ``auto`` calling the C++ kernels,
``sample_pairs`` on the native backend equals the reference, and ``mgc-pretrain --help`` runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

LIBRARY_FILES = {
    "mgc_kernels/__init__.py",
    "mgc_kernels/native.py",
    "mgc_kernels/env.py",
    "mgc_kernels/ops/sample_pairs.py",
    "mgc_kernels/reference/sample_pairs.py",
    "mgc_kernels/triton/info_nce.py",
    "mgc_kernels/losses/mgc.py",
    "mgc_kernels/csrc/bindings.cpp",
    "mgc_kernels/csrc/native.h",
    "mgc_kernels/csrc/cpu/sample_pairs.cpp",
    "mgc_kernels/csrc/cuda/sample_pairs.cu",
    "mgc_kernels/csrc/cuda/geometry.cuh",
    "mgc_pretrain/cli.py",
    "mgc_pretrain/train.py",
}
ALLOWED_TOP = ("mgc_kernels/", "mgc_pretrain/", "mgc_kernels-")


def check(what: str, ok: bool, detail: str = "") -> None:
    if not ok:
        sys.exit(f"FAILED: {what}\n{detail}")
    print(f"ok: {what}", flush=True)


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, **env}, timeout=900
    )


def check_file_list(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    check(
        "the wheel holds the library, the trainer and the csrc/ sources",
        LIBRARY_FILES <= names,
        f"missing: {sorted(LIBRARY_FILES - names)}",
    )
    stray = sorted(
        n
        for n in names
        if not n.startswith(ALLOWED_TOP)
        or re.search(r"\.(so|o|pyc)$|__pycache__|(^|/)tests?/|benchmarks/", n)
    )
    check(
        "the wheel holds nothing else (no tests, benchmarks or binaries)",
        not stray,
        "\n".join(stray),
    )
    check(
        "the wheel carries the license",
        any(n.endswith(".dist-info/licenses/LICENSE") for n in names),
        "\n".join(sorted(names)),
    )


def env_report(*flags: str) -> str:
    proc = run(sys.executable, "-m", "mgc_kernels.env", *flags)
    check(
        " ".join(("python -m mgc_kernels.env",) + flags) + " exits 0",
        proc.returncode == 0,
        proc.stdout + proc.stderr,
    )
    return proc.stdout + proc.stderr


def auto_pick(report: str, op: str) -> str:
    return re.search(rf"^\s+{op}\s+(\w+)", report, re.M).group(1)


def readme_training_step(readme: Path) -> str:
    text = readme.read_text()
    section = text.split("## A training step with MGC", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def before_the_build(wheel: Path) -> None:
    check_file_list(wheel)
    import mgc_kernels as mk

    check(
        "mgc_kernels imports from the installed package, not a checkout",
        "site-packages" in mk.__file__ and (Path(mk.__file__).parent / "csrc").is_dir(),
        mk.__file__,
    )
    report = env_report()
    check(
        "the report is silent on stderr and says the native backend is not built yet",
        "not built yet" in report and "Warning" not in report and "No CUDA" not in report,
        report,
    )
    check(
        "auto uses the reference on CPU before the build",
        auto_pick(report, "sample_pairs") == "torch",
        report,
    )

    report = env_report("--build-native")
    check(
        "--build-native builds the native backend from the installed sources",
        re.search(r"native\s+yes\s+built in", report) is not None,
        report,
    )
    for op in ("correspondence", "sample_pairs", "multigrain_pool"):
        check(
            f"auto picks native for {op} on CPU afterwards (a new process)",
            auto_pick(env_report(), op) == "native",
            report,
        )


def after_the_build(readme: Path) -> None:
    import torch

    import mgc_kernels as mk
    from mgc_kernels import native

    check(
        "a new process finds the build",
        native.status(build=False)[0],
        native.status(build=False)[1],
    )
    calls = {"sample_pairs": 0, "multigrain_pool": 0}

    def counting(name, fn):
        def counted(*args):
            calls[name] += 1
            return fn(*args)

        return counted

    for name in calls:
        setattr(native, name, counting(name, getattr(native, name)))
    exec(compile(readme_training_step(readme), "README: A training step with MGC", "exec"), {})
    check(
        "the README's training step runs, with auto calling the C++ kernels on CPU",
        all(calls.values()),
        str(calls),
    )

    torch.manual_seed(0)
    size = torch.tensor([320.0, 256.0, 320.0, 256.0])
    corners = torch.rand(64, 2, 2).sort(dim=1).values.flatten(1) * size
    boxes1, boxes2 = corners, corners.flip(0) + 1.0  # (x0, y0, x1, y1)
    views = boxes1, torch.rand(64) < 0.5, boxes2, torch.rand(64) < 0.5
    same = [
        torch.equal(a, b)
        for a, b in zip(
            mk.sample_pairs(*views, backend="native"), mk.sample_pairs(*views, backend="torch")
        )
    ]
    check("sample_pairs on the native backend equals the reference", all(same), str(same))

    script = Path(sys.executable).with_name("mgc-pretrain")
    proc = run(str(script), "--help")
    check(
        "mgc-pretrain --help runs",
        proc.returncode == 0 and "usage" in proc.stdout,
        proc.stdout + proc.stderr,
    )


if __name__ == "__main__":
    if sys.argv[1] == "--after-the-build":
        after_the_build(Path(sys.argv[2]))
    else:
        before_the_build(Path(sys.argv[1]))
        sys.exit(
            subprocess.run(
                [sys.executable, __file__, "--after-the-build", sys.argv[2]], timeout=900
            ).returncode
        )
