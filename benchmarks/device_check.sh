#!/usr/bin/env bash
# One device check on a lent GPU (an H200), in one call of the device tool, from the
# repository root:
#
#   bash benchmarks/device_check.sh          (carry [".whl"]; see docs/performance.md)
#
# Steps, each with its own timeout, each logged; a failed step does not stop the rest.
# The whole run keeps within DEVICE_CHECK_BUDGET_S seconds (default 420 = 7 min):
# a step's timeout is cut to what is left, and a step with under 10 s left is skipped.
#   install     the carried wheels (.whl/*.whl: ml_collections, nibabel, grain, TFDS, ...,
#               which the GPU image lacks) into a fresh $DEVICE_CHECK_SITE (/tmp/site),
#               then PYTHONPATH=$DEVICE_CHECK_SITE:$PWD; the image's jax/flax/numpy stay;
#               .whl/extra/protobuf-*.whl only if the image's protobuf is < 5.28.3
#   env         nvidia-smi, python, jax and its devices, pip list, imports   -> env.txt
#   numerics    benchmarks/device_numerics.py: sampler, attention, SegmentationNet
#               forward and gradients on the GPU against the CPU             -> numerics.json
#   target      the GPU's own GpuTargetConfigProto (the AOT path's input), dumped
#               and compared with sean_jax/perf/gpu_target_h200.txtpb
#                                  -> gpu_target_h200_real.txtpb, target_config_diff.txt
#   aot_h200    python -m sean_jax.aot for the compile-only h200 target at a tiny
#               size: does the checked-in target config load in this jax's plugin?
#   benchmark   python -m sean_jax.benchmark (paper preset on a GPU), last, with all
#               the time left: -> bench/benchmark.json and RESULTS.md (a row). It
#               prints one line per precision as it goes, so a run cut short still
#               leaves its float32 line in log.txt. If it fails quickly, a --quick
#               --preset medium run takes its place when time is left.
# Everything printed goes to $OUT/log.txt too. At most 7 files land in $OUT (the
# device tool returns at most 8).
#
# Environment:
#   OUT                    where results go (the device tool sets it; default
#                          /tmp/devcheck_out)
#   DEVICE_CHECK_QUICK=1   benchmark with --quick --preset tiny (a dry run of the script
#                          on a CPU in a few minutes; measures nothing of interest)
#   DEVICE_CHECK_BUDGET_S  total seconds (default 420; give the device tool timeout_s 480)
#   DEVICE_CHECK_SITE      where the wheels are installed (default /tmp/site)
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/devcheck_out}
mkdir -p "$OUT" "$OUT/bench"
BUDGET=${DEVICE_CHECK_BUDGET_S:-420}
SITE=${DEVICE_CHECK_SITE:-/tmp/site}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
export PYTHONPATH=$PWD OUT SITE
TMPD=$(mktemp -d)
SUMMARY=""

left() { echo $(( BUDGET - SECONDS )); }

# step NAME TIMEOUT COMMAND...: runs COMMAND under timeout, logs rc and seconds.
step() {
  local name=$1 limit=$2
  shift 2
  local rest
  rest=$(( $(left) - 5 ))
  if (( limit > rest )); then limit=$rest; fi
  if (( limit < 10 )); then
    echo "=== $name: SKIPPED, ${rest}s left of the ${BUDGET}s budget"
    SUMMARY+="$name: skipped (budget)"$'\n'
    return 99
  fi
  echo "=== $name (timeout ${limit}s) at +${SECONDS}s"
  local t0=$SECONDS rc
  if [[ $(type -t "$1") == function ]]; then  # timeout runs programs, not functions
    timeout -k 10 "$limit" bash -c "$(declare -f "$1"); $*"
  else
    timeout -k 10 "$limit" "$@"
  fi
  rc=$?
  local verdict="ok"
  if (( rc == 124 || rc == 137 )); then verdict="TIMED OUT"; elif (( rc != 0 )); then verdict="FAILED"; fi
  echo "=== $name: $verdict (rc=$rc) in $(( SECONDS - t0 ))s"
  SUMMARY+="$name: $verdict (rc=$rc, $(( SECONDS - t0 ))s)"$'\n'
  return $rc
}

install_wheels() {
  rm -rf "$SITE"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || return
  # grain's generated code needs protobuf >= 5.28.3: only an older image protobuf is
  # shadowed by the carried one (.whl/extra/).
  local have
  have=$(python3 -c "import google.protobuf as p; print(p.__version__)" 2>/dev/null || echo 0)
  echo "image protobuf: $have"
  if python3 -c "import sys; v = tuple(int(x) for x in sys.argv[1].split('.')[:3] if x.isdigit()); sys.exit(v >= (5, 28, 3))" "$have" \
      && compgen -G ".whl/extra/protobuf-*.whl" >/dev/null; then
    echo "installing the carried $(basename .whl/extra/protobuf-*.whl)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/extra/protobuf-*.whl
  fi
}

environment() {
  echo "# $(date -u +%FT%TZ) $(uname -srm), $(nproc) cores"
  echo "## nvidia-smi"
  timeout 30 nvidia-smi || echo "(no nvidia-smi: rc=$?)"
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,ecc.mode.current \
    --format=csv 2>/dev/null
  echo "## python"
  command -v python3
  python3 --version
  echo "PYTHONPATH=$PYTHONPATH"
  echo "## jax"
  timeout 90 python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices(), jax.default_backend()); d = jax.devices()[0]; print(d.device_kind, getattr(d, 'compute_capability', None), (d.memory_stats() or {}).get('bytes_limit'))" 2>&1
  echo "## imports (the carried wheels and the project)"
  timeout 120 python3 - <<'PY' 2>&1
import importlib
for name in ("ml_collections", "nibabel", "grain", "array_record", "tensorflow_datasets",
             "sean_jax.trainer", "sean_jax.data.pipeline", "sean_jax.data.sources",
             "sean_jax.perf.benchmark", "sean_jax.perf.targets", "tfds_aisd"):
  try:
    module = importlib.import_module(name)
    print(f"ok   {name} {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
  except Exception as error:  # noqa: BLE001
    print(f"FAIL {name}: {type(error).__name__}: {error}")
PY
  echo "## pip list"
  timeout 60 python3 -m pip list 2>/dev/null
}

# The GPU's own GpuTargetConfigProto: jax 0.10 had topology.target_config; jax 0.11's
# DeviceTopology has serialize() (a GpuTopologyProto, which holds gpu_target_config),
# read here with the proto descriptors embedded in the CUDA plugin / jaxlib binaries.
cat > "$TMPD/target_config.py" <<'PY'
"""argv: OUT.txtpb CHECKED_IN.txtpb DIFF.txt"""
import difflib, glob, importlib, importlib.util, os, re, sys
import jax
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

out_path, ref_path, diff_path = sys.argv[1:4]
notes = []
LEN_FIELDS, VARINT_FIELDS = {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 15}, {10, 11, 14}


def varint(b, i):
  r = s = 0
  while True:
    c = b[i]; i += 1; r |= (c & 0x7f) << s; s += 7
    if c < 0x80:
      return r, i


def fdp_end(b, i):  # end of a serialized FileDescriptorProto embedded in a binary
  while i < len(b):
    try:
      tag, j = varint(b, i)
    except IndexError:
      return i
    f, w = tag >> 3, tag & 7
    if w == 2 and f in LEN_FIELDS:
      n, j = varint(b, j); i = j + n
    elif w == 0 and f in VARINT_FIELDS:
      _, i = varint(b, j)
    else:
      return i
  return i


def find_file(blobs, name):
  key = b"\n" + bytes([len(name)]) + name.encode()
  for blob in blobs:  # the first binary that has it wins (the plugin's own first)
    best = None
    for m in re.finditer(re.escape(key), blob):
      try:
        fdp = descriptor_pb2.FileDescriptorProto.FromString(
            blob[m.start():fdp_end(blob, m.start())])
      except Exception:  # noqa: BLE001
        continue
      size = len(fdp.message_type) + len(fdp.enum_type)
      if fdp.name == name and (best is None or size > best[0]):
        best = (size, fdp)
    if best:
      return best[1]
  raise LookupError(f"no embedded descriptor of {name}")


def build_pool(blobs, root):
  pool, done = descriptor_pool.DescriptorPool(), set()

  def add(name):
    if name in done:
      return
    done.add(name)
    if name.startswith("google/protobuf/"):
      importlib.import_module("google.protobuf." + os.path.basename(name)[:-6] + "_pb2")
      fdp = descriptor_pb2.FileDescriptorProto()
      descriptor_pool.Default().FindFileByName(name).CopyToProto(fdp)
    else:
      fdp = find_file(blobs, name)
    for dep in fdp.dependency:
      add(dep)
    pool.Add(fdp)
  add(root)
  return pool


def binaries():
  paths = []
  if importlib.util.find_spec("jax_plugins") is not None:
    spec = importlib.util.find_spec("jax_plugins.xla_cuda13")
    for d in (spec.submodule_search_locations or []) if spec else []:
      paths += sorted(glob.glob(os.path.join(d, "*.so")))
  import jaxlib
  paths += sorted(glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), "*.so")))
  notes.append("descriptors searched in: " + ", ".join(os.path.basename(p) for p in paths))
  return [open(p, "rb").read() for p in paths]


devices = jax.devices()
gpu = devices[0].platform == "gpu"
notes.append(f"jax {jax.__version__}, devices {devices}")
text, topology = None, None
for module in ("jaxlib.xla_client", "jaxlib._jax"):
  try:
    topology = importlib.import_module(module).get_topology_for_devices(devices)
  except Exception as e:  # noqa: BLE001
    notes.append(f"{module}.get_topology_for_devices: {type(e).__name__}: {e}")
    continue
  config = getattr(topology, "target_config", None)
  if config:
    text = config if isinstance(config, str) else str(config)
    notes.append(f"from {module}.get_topology_for_devices(...).target_config")
  else:
    notes.append(f"{module}: the topology has no target_config")
  break
pool = build_pool(binaries(), "xla/service/gpu_topology.proto")
Topology = message_factory.GetMessageClass(pool.FindMessageTypeByName("xla.GpuTopologyProto"))
Config = message_factory.GetMessageClass(
    pool.FindMessageTypeByName("stream_executor.GpuTargetConfigProto"))
real = None
if text is not None:
  real = text_format.Parse(text, Config())
elif gpu and topology is not None:
  try:
    proto = Topology.FromString(topology.serialize())
    if proto.HasField("gpu_target_config"):
      real = proto.gpu_target_config
      notes.append("from topology.serialize(): GpuTopologyProto.gpu_target_config")
    else:
      notes.append("GpuTopologyProto without gpu_target_config: "
                   + text_format.MessageToString(proto, as_one_line=True))
  except Exception as e:  # noqa: BLE001
    notes.append(f"topology.serialize() / parse: {type(e).__name__}: {e}")
reference_text = open(ref_path).read()
reference = Config()
try:
  text_format.Parse(reference_text, reference)
  notes.append("checked-in config: parses with these descriptors")
except text_format.ParseError as e:
  notes.append(f"checked-in config does NOT parse strictly with these descriptors: {e}")
  reference = Config()
  text_format.Parse(reference_text, reference, allow_unknown_field=True)
if real is None and not gpu:
  real = reference
  notes.append("NO GPU: dry run; the 'real' config below is the checked-in one re-printed")
header = "".join(f"# {n}\n" for n in notes)
print(header, end="")
if real is None:
  open(out_path, "w").write(header + "# no target config could be read\n")
  open(diff_path, "w").write(header)
  sys.exit(1)
open(out_path, "w").write(header + text_format.MessageToString(real))


def flat(msg, prefix=""):
  for fd, value in msg.ListFields():
    name = prefix + fd.name
    repeated = getattr(fd, "is_repeated", None)
    repeated = fd.label == fd.LABEL_REPEATED if repeated is None else repeated
    if fd.message_type is not None:
      for k, item in enumerate(value if repeated else [value]):
        yield from flat(item, f"{name}[{k}]." if repeated else name + ".")
    else:
      yield name, value


a, b = dict(flat(reference)), dict(flat(real))
changed = [f"{key}: {a.get(key, '(absent)')!r} -> {b.get(key, '(absent)')!r}\n"
           for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
strip = lambda s: [l.rstrip() + "\n" for l in s.splitlines()
                   if l.strip() and not l.lstrip().startswith("#")]
lines = [header, f"# {len(changed)} fields differ (checked-in -> real)\n", *changed,
         "\n# unified diff, comments stripped (field order differs between the two)\n",
         *difflib.unified_diff(strip(reference_text), strip(text_format.MessageToString(real)),
                               "gpu_target_h200.txtpb", "gpu_target_h200_real.txtpb")]
open(diff_path, "w").write("".join(lines))
print(f"target config: {len(changed)} fields differ; wrote {out_path}, {diff_path}")
print("".join(changed), end="")
PY

# Does the real config load as a compile-only target in this jax's CUDA plugin?
cat > "$TMPD/real_topology.py" <<'PY'
import sys
from sean_jax.perf import targets
targets.prepare()
from jax.experimental import topologies
text = open(sys.argv[1]).read()
topology = topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1")
print("compile-only devices from the real config:", list(topology.devices),
      [d.device_kind for d in topology.devices])
PY

main() {
  echo "device_check: OUT=$OUT, budget ${BUDGET}s, quick=${DEVICE_CHECK_QUICK:-0}, $(date -u +%FT%TZ)"

  if compgen -G ".whl/*.whl" >/dev/null; then
    if step install 120 install_wheels; then
      export PYTHONPATH=$SITE:$PWD
    else
      echo "install failed: going on with this python's own packages"
    fi
  else
    echo "=== install: no .whl/*.whl here (name .whl in the device tool's carry)"
    SUMMARY+="install: no wheels"$'\n'
  fi

  step env 200 environment > "$OUT/env.txt" 2>&1
  echo "=== env: $(tail -n +1 "$OUT/env.txt" | grep -c '^FAIL') failed imports; $(grep -m1 '^jax ' "$OUT/env.txt")"
  grep -E '^(FAIL|\[|NVIDIA|name,)' "$OUT/env.txt" | head -20

  step numerics 180 python3 benchmarks/device_numerics.py "$OUT/numerics.json"

  step target 90 python3 "$TMPD/target_config.py" "$OUT/gpu_target_h200_real.txtpb" \
    sean_jax/perf/gpu_target_h200.txtpb "$OUT/target_config_diff.txt"

  if grep -q ' gpu$' "$OUT/env.txt"; then  # jax's default backend, printed by env
    step aot_h200 60 python3 -m sean_jax.aot --targets h200 --dtypes float32 --size 64 \
      --width 4 --partitions 2,2 --batch 2 --no-fit-search --no-record
    if grep -qv '^#' "$OUT/gpu_target_h200_real.txtpb" 2>/dev/null; then
      step real_topology 45 python3 "$TMPD/real_topology.py" "$OUT/gpu_target_h200_real.txtpb"
    fi
  else
    echo "=== aot_h200, real_topology: skipped (no GPU)"
  fi

  local bench_args=()
  if [[ ${DEVICE_CHECK_QUICK:-0} == 1 ]]; then bench_args=(--quick --preset tiny); fi
  local t0=$SECONDS
  step benchmark $(( $(left) - 15 )) python3 -m sean_jax.benchmark ${bench_args[@]+"${bench_args[@]}"} \
    --results-dir "$OUT/bench"
  local rc=$?
  if (( rc != 0 && rc != 124 && rc != 137 && rc != 99 && $(left) > 120 )); then
    echo "benchmark failed after $(( SECONDS - t0 ))s: a --quick --preset medium run instead"
    step benchmark_quick $(( $(left) - 10 )) python3 -m sean_jax.benchmark --quick \
      --preset medium --results-dir "$OUT/bench"
  fi

  echo "=== after: $(timeout 20 nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  rm -rf "$TMPD"
  echo "=== summary (${SECONDS}s of the ${BUDGET}s budget)"
  printf '%s' "$SUMMARY"
  echo "=== files in \$OUT:"
  (cd "$OUT" && find . -type f | sort)
}

main 2>&1 | tee "$OUT/log.txt"
