#!/usr/bin/env bash
# Issue 11, part 3: prove the CUDA path on a machine that has one, in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # prints one JSON object on stdout, progress on stderr
#
# 1. installs the requirements (a GPU machine already carries the pinned torch, so this is quick),
# 2. runs the test suite (the web UI tests need a browser and are left out),
#    on CUDA: the CUDA graph against eager steps (tests/test_fast_step.py), bf16 autocast training
#    (tests/test_train.py) and everything else that takes the device when it is there,
# 3. the generation benchmark on CUDA: sc09 at batch 1, 16 and 64; the engine replays one period
#    of the schedule as a CUDA graph (fast_step.PeriodGraph), the functional step runs eagerly,
# 4. training throughput: sc09, 4 x 16,000 samples, float32 and bf16 autocast, forward + backward
#    + AdamW.
# Written without a GPU at hand (none was lent to the sessions that wrote it): its first run on
# one is its test.
# Each stage has its own time limit, so a hang in one still leaves the others' figures.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=$(mktemp -d)
log() { echo "gpu_check: $*" >&2; }

if ! $PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "torch sees no CUDA GPU; nothing to check"
    exit 2
fi

log "installing requirements"
timeout 120 $PYTHON -m pip install -q -r requirements-dev.txt >&2
echo $? > "$OUT/install.rc"

log "test suite"
timeout 180 $PYTHON -m pytest tests -q -x --ignore tests/test_app.py -p no:cacheprovider \
    > "$OUT/tests.txt" 2>&1
echo $? > "$OUT/tests.rc"
tail -3 "$OUT/tests.txt" >&2

log "generation benchmark (sc09, CUDA)"
timeout 150 $PYTHON benchmarks/bench_generation.py --preset sc09 --devices cuda \
    --batch-sizes 1 16 64 --seconds 2 --repeats 3 --naive-length 16 \
    > "$OUT/generation.json" 2> "$OUT/generation.err"
echo $? > "$OUT/generation.rc"

log "training throughput (sc09, 4 x 16,000)"
timeout 120 $PYTHON - > "$OUT/training.json" 2> "$OUT/training.err" <<'EOF'
import json
import time

import torch

from sashimi import SaShiMi, SaShiMiConfig
from sashimi.model import nll_bits, shift_inputs
from train.config import TrainConfig
from train.loop import make_optimizer

torch.manual_seed(0)
device = torch.device("cuda")
batch, length, steps = 4, 16_000, 5
result = {"device": torch.cuda.get_device_name(), "batch": batch, "length": length}
for precision in ("float32", "bf16-autocast"):
    model = SaShiMi(SaShiMiConfig.preset("sc09")).to(device).train()
    optimizer = make_optimizer(model, TrainConfig(data="", out=""))
    targets = torch.randint(0, model.config.n_classes, (batch, length), device=device)
    inputs = shift_inputs(targets, model.start_token)

    def step():
        with torch.autocast("cuda", torch.bfloat16, enabled=precision != "float32"):
            loss = nll_bits(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss

    step()  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    result[precision] = {
        "samples_per_s": round(batch * length / seconds),
        "step_s": round(seconds, 4),
        "loss_bits": round(loss.item(), 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
print(json.dumps(result))
EOF
echo $? > "$OUT/training.rc"

$PYTHON - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def read_json(name):
    try:
        return json.loads((out / name).read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError) as error:
        return {"error": f"{name}: {error}"}


print(json.dumps({
    "check": "gpu",
    "exit_codes": {s: int((out / f"{s}.rc").read_text()) for s in
                   ("install", "tests", "generation", "training")},
    "tests": (out / "tests.txt").read_text().strip().splitlines()[-1:],
    "generation": read_json("generation.json"),
    "training": read_json("training.json"),
}))
EOF
