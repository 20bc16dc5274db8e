"""The careful and the hostile user's drill of issue 12, points 1-4, through the real commands.

Each case breaks something on purpose (a full disk, a save killed between its two renames, a
damaged checkpoint or trainer state, audio that is not audio or may not be read), runs the command
a user would in a subprocess, and records its exit status, its error line, whether it printed a
traceback, and how many stray MP3-decoder lines reached stderr. A case passes when the command
explains itself in one line (exit 2 for a user error, 1 for a full disk), without a traceback,
and where a save was involved the previous save still loads and nothing half-written is left.
The full disks are tmpfs mounts and the unreadable files are read as the user nobody: both need
root (CI runs as root); as another user the full disk rows say so and files are read as is.
24 cases; 18 minutes of commands on a 2-core machine shared with a training run.

    python benchmarks/drill.py          # a table on stderr, one JSON object on stdout
"""

import contextlib
import io
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from safetensors.torch import load_file, save_file  # noqa: E402

import sashimi.evaluate  # noqa: E402
from sashimi.checkpoint import load_checkpoint  # noqa: E402

TRAIN = "--preset tiny --seq-len 256 --batch-size 2 --warmup 2 --device cpu --num-samples 1"
TRAIN += " --sample-seconds 0.05 --valid-every 2 --save-every 2 --log-every 2"
ROOT = os.geteuid() == 0


def run(args: list[str]) -> dict:
    """Run `python ARGS` from the repository; the error line and the count of unexplained lines."""
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    # progress bars, the resolved config and other logs are expected; a traceback is not
    traceback = any(line.startswith("Traceback") for line in lines)
    return {
        "exit": result.returncode,
        "error": errors[-1] if errors else (lines[-1] if traceback else ""),
        "traceback": traceback,
        "stray": sum(line.startswith(("Note:", "Warning:")) for line in lines),  # mpg123's
        "seconds": round(time.perf_counter() - started, 1),
        "log": lines,
    }


def run_in_process(main, args: list[str]) -> dict:
    """main(args) in this process with stderr captured, as the user nobody when run as root (who
    may read any file): a subprocess as nobody may not reach an interpreter installed under /root."""
    started = time.perf_counter()
    stderr = io.StringIO()
    if ROOT:
        nobody = pwd.getpwnam("nobody")
        os.setegid(nobody.pw_gid)
        os.seteuid(nobody.pw_uid)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = main(args)
            except SystemExit as exit:
                status = exit.code
    finally:
        if ROOT:
            os.seteuid(0)
            os.setegid(0)
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    return {
        "exit": status,
        "error": errors[-1] if errors else "",
        "traceback": any(line.startswith("Traceback") for line in lines),
        "stray": 0,
        "seconds": round(time.perf_counter() - started, 1),
        "log": lines,
    }


def write_audio(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(8000) / 8000
    for k, f in enumerate((220, 330, 440, 550)):
        sf.write(folder / f"tone_{k}.wav", 0.4 * np.sin(2 * np.pi * f * t), 8000)
    return folder


def leftovers(run_dir: Path) -> list[str]:
    return sorted(
        p.name for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".old")) or ".tmp" in p.name
    )


def trained_run(base: Path, data: Path) -> Path:
    """A run of 2 steps (last/ and best/ saved once): the reference the cases copy and break."""
    out = base / "reference"
    args = ["-m", "train", "--data", str(data), "--out", str(out), *TRAIN.split(), "--steps", "2"]
    result = run(args)
    if result["exit"] != 0:
        raise RuntimeError(f"the reference run failed: {result['error']}")
    return out


def case(name: str, expected_exit: int, result: dict, ok: bool = True, note: str = "") -> dict:
    passed = result["exit"] == expected_exit and not result["traceback"] and ok
    shown = {k: v for k, v in result.items() if k != "log"}
    return {"case": name, **shown, "expected_exit": expected_exit, "pass": passed, "note": note}


def full_disk(base: Path, data: Path, reference: Path) -> list[dict]:
    if not ROOT:
        return [
            {"case": "train on a 2 MB disk", "pass": None, "note": "needs root to mount a tmpfs"}
        ]
    rows = []
    for size in ("2m", "1m"):
        disk = base / f"disk_{size}"
        disk.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True
        )
        try:
            out = disk / "run"
            args = ["-m", "train", "--data", str(data), "--out", str(out), *TRAIN.split()]
            result = run([*args, "--steps", "20"])
            left = leftovers(out) if out.exists() else []
            loads = True
            if (out / "last").exists():
                try:
                    load_checkpoint(out / "last")
                except (FileNotFoundError, ValueError):
                    loads = False
            note = f"left behind: {left}" if left else "nothing half-written left"
            note += "; last/ loads" if (out / "last").exists() and loads else "; no last/ yet"
            rows.append(
                case(f"train on a {size[:-1]} MB tmpfs", 1, result, not left and loads, note)
            )
        finally:
            subprocess.run(["umount", str(disk)], check=True)
    return rows


def killed_between_renames(base: Path, data: Path, reference: Path) -> list[dict]:
    out = shutil.copytree(reference, base / "renames")
    os.replace(out / "last", out / "last.old")  # what kill -9 leaves between the two renames
    (out / "last.tmp").mkdir()
    args = ["-m", "train", "--data", str(data), "--out", str(out), *TRAIN.split(), "--steps", "4"]
    fresh = run(args)
    rows = [case("fresh run over a run killed between renames", 2, fresh)]
    rendered = run(render(out / "last", base))
    rows.append(case("render last/ of that run", 0, rendered))
    resumed = run(["-m", "train", "--out", str(out), "--resume", "--steps", "4"])
    rows.append(case("--resume it", 0, resumed, not leftovers(out), f"left: {leftovers(out)}"))
    return rows


def render(checkpoint: Path, base: Path, *extra: str) -> list[str]:
    out = str(base / "rendered")
    return ["-m", "sashimi.render", "--checkpoint", str(checkpoint), "--out", out, *extra,
            "--seconds", "0.01", "--device", "cpu"]  # fmt: skip


def evaluate(checkpoint: Path, data: Path) -> list[str]:
    return ["-m", "sashimi.evaluate", "--checkpoint", str(checkpoint), "--data", str(data),
            "--seq-len", "256", "--device", "cpu"]  # fmt: skip


def damaged_checkpoints(base: Path, data: Path, reference: Path) -> list[dict]:
    good = reference / "best"

    def config(**changes):
        def edit(folder):
            saved = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**saved, **changes}))

        return edit

    def nan(folder):
        weights = load_file(folder / "model.safetensors")
        weights["embedding.weight"][0] = float("nan")
        save_file(weights, folder / "model.safetensors")

    damages = {
        "config.json holds []": lambda f: (f / "config.json").write_text("[]"),
        'd_model "wide"': config(d_model="wide"),
        "an unknown key": config(widht=2),
        "d_model twice the weights'": config(d_model=32),
        "weights hold NaN": nan,
        "weights cut short": lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00"),
    }
    rows = []
    for name, damage in damages.items():
        folder = shutil.copytree(good, base / "damaged" / name.replace(" ", "_"))
        damage(folder)
        for command, args in (
            ("render", render(folder, base)),
            ("evaluate", evaluate(folder, data)),
        ):
            result = run(args)
            named = str(folder) in result["error"]
            rows.append(
                case(f"{command}: {name}", 2, result, named, "" if named else "file not named")
            )
    return rows


def damaged_resume(base: Path, data: Path, reference: Path) -> list[dict]:
    damages = {
        "trainer_state.safetensors cut short": ("trainer_state.safetensors", b"\x10\x00"),
        "trainer_state.json not JSON": ("trainer_state.json", b"{step"),
        "trainer_state.json holds []": ("trainer_state.json", b"[]"),
        "last/config.json not JSON": ("config.json", b"{"),
    }
    rows = []
    for k, (name, (file, content)) in enumerate(damages.items()):
        out = shutil.copytree(reference, base / f"resume_{k}")
        (out / "last" / file).write_bytes(content)
        result = run(["-m", "train", "--out", str(out), "--resume", "--steps", "4"])
        named = str(out / "last" / file) in result["error"]
        rows.append(
            case(f"--resume with {name}", 2, result, named, "" if named else "file not named")
        )
    return rows


def bad_audio(base: Path, data: Path, reference: Path) -> list[dict]:
    checkpoint = reference / "best"
    rows = []
    rng = np.random.default_rng(0)
    prompts = base / "prompts"
    prompts.mkdir()
    (prompts / "garbage.mp3").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    sf.write(prompts / "good.mp3", 0.3 * np.sin(np.arange(16000) / 10), 16000, format="MP3")
    mp3 = (prompts / "good.mp3").read_bytes()
    (prompts / "damaged.mp3").write_bytes(mp3[:200] + bytes(1000) + mp3[1200:])
    for name in ("garbage.mp3", "damaged.mp3"):
        result = run(render(checkpoint, base, "--prompt", str(prompts / name)))
        ok = "not readable as audio" in result["error"] and "pipe" not in result["error"]
        rows.append(case(f"render --prompt {name}", 2, result, ok and result["stray"] == 0))

    folder = write_audio(base / "odd_folder")
    sf.write(folder / "locked.wav", np.zeros(800), 8000)
    (folder / "locked.wav").chmod(0o000)
    (folder / "closed").mkdir()
    (folder / "closed").chmod(0o000)
    (folder / "loop.wav").symlink_to(folder / "loop.wav")
    (folder / "up").symlink_to(folder)
    result = run_in_process(sashimi.evaluate.main, evaluate(checkpoint, folder)[2:])
    wanted = {
        "locked.wav": "permission denied",
        "closed": "folder cannot be listed (permission denied)",
        "loop.wav": "symlink loop",
        "up": "searched already",
    }
    missing = [
        f
        for f, why in wanted.items()
        if not any(f"/{f}: " in line and why in line for line in result["log"])
    ]
    note = f"not in the skipped list: {missing}" if missing else "all four in the skipped list"
    rows.append(
        case("evaluate a folder: locked file, closed folder, loops", 0, result, not missing, note)
    )
    return rows


def main() -> int:
    torch.set_num_threads(1)  # as in every subprocess (OMP_NUM_THREADS=1)
    base = Path(tempfile.mkdtemp(prefix="sashimi-drill-"))
    base.chmod(0o755)
    data = write_audio(base / "data")
    reference = trained_run(base, data)
    rows = []
    try:
        for drill in (
            full_disk,
            killed_between_renames,
            damaged_checkpoints,
            damaged_resume,
            bad_audio,
        ):
            rows += drill(base, data, reference)
    finally:
        for parent, folders, _ in os.walk(base):
            for name in folders:
                if not os.path.islink(os.path.join(parent, name)):
                    os.chmod(os.path.join(parent, name), 0o755)
        shutil.rmtree(base)
    width = max(len(r["case"]) for r in rows)
    for r in rows:
        mark = {True: "ok", False: "FAIL", None: "skip"}[r["pass"]]
        exit_status, error = r.get("exit", "-"), r.get("error", "")[:140]
        print(
            f"{mark:4}  {r['case']:{width}}  exit {exit_status}  {error}  {r['note']}",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "drill": "issue 12 points 1-4",
                "torch": torch.__version__,
                "root": ROOT,
                "cases": rows,
            }
        )
    )
    return 0 if all(r["pass"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
