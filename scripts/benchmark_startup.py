"""Start-up and predict as whole processes: `python scripts/benchmark.py startup` (issue 31's rows).

On one generated folder of real-sized JPEGs (300 px by default, the circles and triangles of
scripts/benchmark.py) and one model, EfficientNet-Lite0 at 224 px (its shipped weights, a
default frozen `python train.py` of one epoch, then `python export.py format=onnx`), each row a
new process, side by side in one run:

  imports       each task's module (`python -c "import transferkit.tasks.<task>"`), and the
                heavy packages it pulls in; `import torch` alone beside;
  start-up      `predict.py` on one image, from process start to that image decoded (the first
                decode marks the time: nothing of the package is changed), on the checkpoint
                with its export cached and on its model.onnx: target <= 3 s;
  serve         `serve.py` from process start to its first answered POST /predict: <= 5 s;
  predict       `predict.py` over --images files on the checkpoint (export cached), on its
                model.onnx, and a bare process doing the same work by hand (onnxruntime, PIL
                decode and numpy preprocessing in one loop, batches of 32): the checkpoint within
                1.1x of the model.onnx, both within 1.3x of the bare loop; and the checkpoint on
                PyTorch (runtime=torch), what the onnxruntime default saves.

Each row is the best of --repeats runs, the runs of rows compared with each other interleaved,
so that other work on the machine slows them alike (the load average is printed). Prints a
markdown table and writes it to --out/startup.md. Nothing here is used by the package.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

from benchmark import cpu_model, generate_dataset, load_average

REPO = Path(__file__).resolve().parents[1]
TASKS = ("train", "eval", "predict", "serve", "export", "audit")
HEAVY = (
    "lightning", "torchmetrics", "timm", "torchvision", "matplotlib", "scipy", "sklearn", "pandas",
    "mlflow", "optuna", "wandb", "cleanlab", "onnxruntime", "onnx", "fastapi",
)  # fmt: skip
BATCH = 32  # conf/predict.yaml's batch_size, which the bare loop uses too

IMPORT = textwrap.dedent(
    """
    import json, sys, time
    started = time.perf_counter()
    import transferkit.tasks.{task}
    heavy = [name for name in {heavy!r} if name in sys.modules]
    print(json.dumps({{"s": time.perf_counter() - started, "heavy": heavy}}))
    """
)
# predict.py as its own entry point runs it, the time of its first decoded image printed (a
# DataLoader worker's, when there are workers: they are forked with the wrapper in place).
FIRST_DECODE = textwrap.dedent(
    """
    import runpy, sys, time
    import transferkit.inference.loop as loop
    decode = loop.load_rgb
    def first(path):
        image = decode(path)
        print(f"FIRST-DECODE {time.time():.6f}", flush=True)
        loop.load_rgb = decode
        return image
    loop.load_rgb = first
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)
BARE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np, onnxruntime as ort
    from PIL import Image
    model, folder = Path(sys.argv[1]), Path(sys.argv[2])
    pre = json.loads(model.with_name("model.json").read_text())["preprocessing"]
    assert pre["crop_mode"] == "center", pre
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[pre["interpolation"]]
    mean = np.array(pre["mean"], np.float32).reshape(3, 1, 1)
    std = np.array(pre["std"], np.float32).reshape(3, 1, 1)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    def load(path):
        image = Image.open(path).convert("RGB")
        short, size = min(image.size), pre["resize_size"]
        image = image.resize((int(size * image.width / short), int(size * image.height / short)), resample)
        crop = pre["image_size"]
        left, top = round((image.width - crop) / 2), round((image.height - crop) / 2)
        image = image.crop((left, top, left + crop, top + crop))
        return (np.asarray(image, np.float32).transpose(2, 0, 1) / 255 - mean) / std
    files = sorted(p for p in folder.rglob("*.jpg"))
    for start in range(0, len(files), int(sys.argv[3])):
        session.run(None, {name: np.stack([load(p) for p in files[start : start + int(sys.argv[3])]])})
    """
)


def env() -> dict[str, str]:
    """Offline, as a user's machine without a network: nothing may be fetched."""
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(command: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done


def import_rows(repeats: int, work: Path) -> list[dict]:
    """Each task's module imported in a new interpreter: the process's wall time (best of
    `repeats`) and the heavy packages it brought in; `import torch` alone for scale."""
    rows = []
    for task in TASKS:
        walls, heavy = [], []
        for _ in range(repeats):
            wall, done = run([sys.executable, "-c", IMPORT.format(task=task, heavy=HEAVY)], work)
            walls.append(wall)
            heavy = json.loads(done.stdout.strip().splitlines()[-1])["heavy"]
        rows.append(
            {
                "row": f"import transferkit.tasks.{task}",
                "s": min(walls),
                "note": ", ".join(heavy) or "-",
            }
        )
    walls = [run([sys.executable, "-c", "import torch"], work)[0] for _ in range(repeats)]
    rows.append({"row": "import torch (for scale)", "s": min(walls), "note": ""})
    return rows


def first_decode(model: Path, image: Path, work: Path, runtime_dir: Path) -> float:
    """Seconds from predict.py's process start to its first image decoded."""
    command = [sys.executable, "-c", FIRST_DECODE, str(REPO / "predict.py"), f"ckpt_path={model}",
               f"input={image}", f"paths.root_dir={work}", f"runtime_dir={runtime_dir}"]  # fmt: skip
    started = time.time()
    _, done = run(command, work)
    marks = [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("FIRST-DECODE")]
    return min(marks) - started


def post(url: str, body: bytes) -> bool:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/jpeg"}, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status == 200
    except OSError:
        return False


def first_answer(model: Path, image: Path, work: Path, runtime_dir: Path, port: int) -> float:
    """Seconds from serve.py's process start to its first answered POST /predict."""
    command = [sys.executable, str(REPO / "serve.py"), f"ckpt_path={model}", f"port={port}",
               f"paths.root_dir={work}", f"runtime_dir={runtime_dir}"]  # fmt: skip
    body = image.read_bytes()
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=work, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while not post(f"http://127.0.0.1:{port}/predict", body):
            if process.poll() is not None or time.perf_counter() - started > 300:
                raise SystemExit(f"serve.py on {model} did not answer")
            time.sleep(0.02)
        return time.perf_counter() - started
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def prepare(root: Path, work: Path, runtime_dir: Path) -> tuple[Path, Path]:
    """A default frozen train.py run of one epoch on the data, its checkpoint's export made (a
    first predict), and export.py's model.onnx of it."""
    train = [sys.executable, str(REPO / "train.py"), "data=imagefolder", f"data.root={root}",
             "trainer.max_epochs=1", f"paths.root_dir={work}", f"features.exports_dir={runtime_dir}",
             "callbacks.rich_progress_bar=null"]  # fmt: skip
    run(train, work)
    (run_dir,) = (work / "logs" / "train" / "runs").iterdir()
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    image = next(root.rglob("*.jpg"))
    run([sys.executable, str(REPO / "predict.py"), f"ckpt_path={ckpt}", f"input={image}",
         f"paths.root_dir={work}", f"runtime_dir={runtime_dir}"], work)  # fmt: skip
    run([sys.executable, str(REPO / "export.py"), f"ckpt_path={ckpt}", "format=onnx",
         f"output={work / 'exported'}", f"paths.root_dir={work}"], work)  # fmt: skip
    return ckpt, work / "exported" / "model.onnx"


def predict_rows(
    ckpt: Path, onnx: Path, folder: Path, work: Path, runtime_dir: Path, repeats: int
) -> list[dict]:
    """predict.py over `folder` on the checkpoint and on its model.onnx, the bare loop, and the
    checkpoint on PyTorch (runtime=torch: what the onnxruntime default saves), interleaved, best
    of `repeats` each."""
    commands = {
        "ckpt": [sys.executable, str(REPO / "predict.py"), f"ckpt_path={ckpt}", f"input={folder}",
                 f"paths.root_dir={work}", f"runtime_dir={runtime_dir}"],
        "onnx": [sys.executable, str(REPO / "predict.py"), f"ckpt_path={onnx}", f"input={folder}",
                 f"paths.root_dir={work}"],
        "bare": [sys.executable, "-c", BARE, str(onnx), str(folder), str(BATCH)],
    }  # fmt: skip
    commands["torch"] = [*commands["ckpt"], "runtime=torch"]
    walls: dict[str, list[float]] = {key: [] for key in commands}
    runtime = {}
    for _ in range(repeats):
        for key, command in commands.items():
            wall, done = run(command, work)
            walls[key].append(wall)
            if key != "bare":
                runtime[key] = latest_results(work)["runtime"]
    best = {key: min(values) for key, values in walls.items()}
    n = sum(1 for _ in folder.rglob("*.jpg"))
    return [
        {"row": f"predict.py, checkpoint (export cached; {runtime['ckpt']}), {n} images", "s": best["ckpt"],
         "note": f"{best['ckpt'] / best['onnx']:.2f}x model.onnx, {best['ckpt'] / best['bare']:.2f}x bare"},
        {"row": f"predict.py, model.onnx ({runtime['onnx']}), {n} images", "s": best["onnx"],
         "note": f"{best['onnx'] / best['bare']:.2f}x bare"},
        {"row": f"bare process: onnxruntime + PIL decode loop, batch {BATCH}, {n} images", "s": best["bare"],
         "note": f"{n / best['bare']:.1f} images/s"},
        {"row": f"predict.py, checkpoint, runtime={runtime['torch']} (eager PyTorch), {n} images",
         "s": best["torch"], "note": f"{best['torch'] / best['ckpt']:.2f}x the checkpoint on onnxruntime"},
    ]  # fmt: skip


def latest_results(work: Path) -> dict:
    runs = sorted((work / "logs" / "predict" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    return json.loads((runs[-1] / "results.json").read_text())


def targets(rows: list[dict]) -> list[tuple[str, bool]]:
    start = [r for r in rows if r["row"].startswith("predict.py start-up")]
    serve = [r for r in rows if r["row"].startswith("serve.py")]
    ckpt = next(r for r in rows if r["row"].startswith("predict.py, checkpoint"))
    onnx = next(r for r in rows if r["row"].startswith("predict.py, model.onnx"))
    bare = next(r for r in rows if r["row"].startswith("bare process"))
    return [
        *[(f"{r['row']} <= 3 s", r["s"] <= 3.0) for r in start],
        *[(f"{r['row']} <= 5 s", r["s"] <= 5.0) for r in serve],
        ("predict.py on the checkpoint within 1.1x of model.onnx", ckpt["s"] <= 1.1 * onnx["s"]),
        ("predict.py on the checkpoint within 1.3x of the bare loop", ckpt["s"] <= 1.3 * bare["s"]),
        ("predict.py on model.onnx within 1.3x of the bare loop", onnx["s"] <= 1.3 * bare["s"]),
    ]


def table(rows: list[dict]) -> str:
    lines = ["| row | s | |", "|---|---|---|"]
    lines += [f"| {row['row']} | {row['s']:.2f} | {row['note']} |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=640, help="predict's files (train + val of the data)")
    parser.add_argument("--size", type=int, default=300, help="side of the generated JPEGs")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each row (the best is shown)")
    parser.add_argument("--port", type=int, default=8765, help="where serve.py listens while it is timed")
    parser.add_argument("--out", type=Path, default=Path("/tmp/transferkit-bench-startup"))
    args = parser.parse_args(argv)
    out = args.out.resolve()
    load = load_average()
    root = generate_dataset(out / "data", args.images, args.size)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    runtime_dir = work / "exports"
    ckpt, onnx = prepare(root, work, runtime_dir)
    image = next(root.rglob("*.jpg"))
    rows = import_rows(args.repeats, work)
    models = {"checkpoint, export cached": ckpt, "model.onnx": onnx}
    starts: dict[str, list[float]] = {name: [] for name in models}
    answers: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            starts[name].append(first_decode(model, image, work, runtime_dir))
            answers[name].append(first_answer(model, image, work, runtime_dir, args.port))
    for name in models:
        rows.append({"row": f"predict.py start-up, {name}: process start to first image decoded",
                     "s": min(starts[name]), "note": ""})  # fmt: skip
    for name in models:
        rows.append({"row": f"serve.py, {name}: process start to first answered /predict",
                     "s": min(answers[name]), "note": ""})  # fmt: skip
    rows += predict_rows(ckpt, onnx, root, work, runtime_dir, args.repeats)
    checks = "\n".join(f"- {'holds' if ok else 'FAILS'}: {what}" for what, ok in targets(rows))
    report = (
        f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores, load average {load:.2f} at the start and "
        f"{load_average():.2f} at the end; "
        f"Lite0 at 224 px (shipped weights, one frozen epoch), {args.size} px JPEGs\n\n"
        f"{table(rows)}\n\n{checks}\n"
    )
    print(report)
    (out / "startup.md").write_text(report)
