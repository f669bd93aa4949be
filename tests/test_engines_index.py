"""``engines.json`` as a frozen index: format version checked first, every malformed shape named, the rebuild
command made of real build_engines.py flags, and the device a backend opens on checked against the engines."""

from __future__ import annotations

import json

import pytest

from sparse_context.engines.buckets import BucketPlan, Resolution
from sparse_context.engines.errors import BuildOptionError, EnginesIndexError
from sparse_context.engines.index import FORMAT_VERSION, EnginesIndex, GraphEntry, check_device

# Resolutions build_engines.py offers as choices, so the recorded build arguments parse back.
PLAN = BucketPlan(keep_fractions=(0.1, 1.0), max_refs=3, ref_resolution=Resolution(512, 512),
                  target_resolutions=(Resolution(512, 512),), text_tokens=64).validate()


def make_index(**changes) -> EnginesIndex:
    values = dict(backend="ort-cpu", model_dir="/models/klein", precision="fp32", attention="matmul", plan=PLAN,
                  graphs={"kv": GraphEntry(onnx="onnx/x/model.onnx", onnx_sha256="ab" * 32,
                                           profiles=({"name": "keep0.10/extract"},))},
                  providers=("CPUExecutionProvider",))
    values.update(changes)
    return EnginesIndex(**values)


def test_round_trip_through_the_file(tmp_path):
    index = make_index(lora="/l/sc.safetensors", lora_sha256="cd" * 32, lora_scale=0.5,
                       graphs={"full": GraphEntry("f.onnx", "0" * 64, (), engine="trt/f.engine"),
                               "kv": GraphEntry("k.onnx", "1" * 64, (), provider_options={"a": "1"})},
                       parts={"vae_decoder": GraphEntry("onnx/d.onnx", "2" * 64, ({"bucket": "parts"},))},
                       files={"model/tokenizer/tokenizer.json": "3" * 64}, scheduler_config={"shift": 3.0})
    index.write(tmp_path)
    data = json.loads((tmp_path / "engines.json").read_text())
    assert data["format"] == FORMAT_VERSION and data["build_args"] == list(PLAN.build_args())
    assert "folder" not in data
    read = EnginesIndex.read(tmp_path)
    assert read == index and read.path(read.graphs["full"].engine) == tmp_path.resolve() / "trt" / "f.engine"


@pytest.mark.parametrize("path", ["/etc/model.onnx", "../elsewhere/model.onnx", "onnx/../../x.onnx", "~/m.onnx", ""])
def test_paths_may_not_leave_the_folder(path):
    data = make_index().to_json()
    data["graphs"]["kv"]["onnx"] = path
    with pytest.raises(EnginesIndexError, match="a path relative to the engines folder, inside it.*--engines"):
        EnginesIndex.from_json(data)


@pytest.mark.parametrize("change, match", [
    (dict(format=1), rf"format 1; this version reads format {FORMAT_VERSION}; rebuild it "
                       r".*build_engines.py --model /models/klein --backend ort-cpu --precision fp32 --keeps 0.1"),
    (dict(format=2), rf"format 2; this version reads format {FORMAT_VERSION}; rebuild it "
                       r".*build_engines.py --model /models/klein --backend ort-cpu --precision fp32 --keeps 0.1"),
    (dict(format=3), rf"format 3; this version reads format {FORMAT_VERSION}; rebuild it "
                       r".*build_engines.py --model /models/klein --backend ort-cpu --precision fp32 --keeps 0.1"),
    (dict(format=None), "format None"),
    (dict(graphs={}), "graphs: got {}; allowed: at least one of full, kv"),
    (dict(graphs={"kv": []}), "graph 'kv': got 'list'; allowed: an object"),
    (dict(graphs={"kv": {"onnx": "x"}}), "graph 'kv': missing onnx_sha256, profiles"),
    (dict(plan={"max_refs": 3}), "recorded bucket plan"),
    (dict(plan=[]), "recorded bucket plan: got \\[\\]"),
    (dict(graphs={"mystery": {}}), "graphs: got .*allowed: at least one of full, kv"),
    (dict(graphs={"kv": {"onnx": "m.onnx", "onnx_sha256": "0", "profiles": {}}}), "profiles: got 'dict'"),
    (dict(scheduler_config=[1]), "scheduler_config: got 'list'"),
], ids=["old-format", "format-2", "format-3-stacked-kv", "no-format", "no-graphs", "graph-not-object", "graph-fields", "plan", "plan-list",
        "unknown-graph", "profiles-not-list", "scheduler-not-object"])
def test_malformed_index_names_the_problem(change, match):
    data = {**make_index().to_json(), **change}
    if change.get("format", 0) is None:
        data.pop("format")
    with pytest.raises(EnginesIndexError, match=match):
        EnginesIndex.from_json(data)


def test_malformed_index_shapes():
    with pytest.raises(EnginesIndexError, match="got 'list'; allowed: a JSON object"):
        EnginesIndex.from_json([])
    data = make_index().to_json()
    del data["precision"]
    with pytest.raises(EnginesIndexError, match="missing precision"):
        EnginesIndex.from_json(data)
    with pytest.raises(BuildOptionError, match="engines backend: got 'tpu'.*--backend"):
        EnginesIndex.from_json({**make_index().to_json(), "backend": "tpu"})


def test_unreadable_file(tmp_path):
    with pytest.raises(EnginesIndexError, match="a folder with engines.json written by build_engines.py.*--engines"):
        EnginesIndex.read(tmp_path)  # none there
    (tmp_path / "engines.json").write_text('{"format": 4, "backend": "ort-c')  # a copy cut short
    with pytest.raises(EnginesIndexError, match=r"engines.json is not readable JSON \(Unterminated string.*line 1 "
                                                r"column 26.*copy the engines folder again or rebuild it.*--engines"):
        EnginesIndex.read(tmp_path)


def test_build_command_uses_real_flags():
    from sparse_context.build_engines import build_parser
    from sparse_context.engines.build import build_command

    index = make_index(lora="/l/sc.safetensors", lora_scale=0.5, transformer_file="/t/ckpt.safetensors")
    command = build_command(index, "/out/new", precision="fp16", lora_scale=0.8)
    words = command.split()
    assert words[:2] == ["python", "build_engines.py"]
    args = build_parser().parse_args(words[2:])  # every flag it names is one build_engines.py defines
    assert (args.precision, args.lora_scale, str(args.lora), str(args.transformer)) == (
        "fp16", 0.8, "/l/sc.safetensors", "/t/ckpt.safetensors")
    assert args.keeps == [0.1, 1.0] and args.text_tokens == 64 and str(args.out) == "/out/new"
    assert args.graphs == ["kv"]  # only the graphs that were built
    without = build_command(index, "/o", lora=None).split()
    assert "--lora" not in without and "--lora-scale" not in without
    with pytest.raises(BuildOptionError, match="build_command changes: got \\['speed'\\]"):
        build_command(index, "/o", speed=2)


def test_device_must_be_where_the_engines_run():
    cpu, gpu = make_index(), make_index(backend="ort-cuda")
    assert check_device(cpu, None) == 0 and check_device(cpu, "cpu") == 0
    assert check_device(gpu, "cuda") == 0 and check_device(gpu, "cuda:1") == 1
    with pytest.raises(BuildOptionError, match="device: got 'cuda'.*--backend ort-cpu, which runs on cpu.*--device"):
        check_device(cpu, "cuda")
    for wrong in ("cpu", "cuda:x", "gpu"):
        with pytest.raises(BuildOptionError, match="cuda or cuda:N.*--device"):
            check_device(gpu, wrong)
