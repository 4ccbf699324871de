"""A user's own training script, as cvgraph's bring-your-own-trainer contract has it
(``workloads/training/byo.py``): nearest class centroid on gray thumbnails, in numpy, written as
ONNX with onnx's helper — no torch, no cvgraph import. It reads the shards channel, the manifest
channel and the hyperparameters, logs through Dagster Pipes when the orchestrator opened a
session, and writes model.onnx and metrics.json into SM_MODEL_DIR."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

hp = json.loads((Path(os.environ["SM_INPUT_CONFIG_DIR"]) / "hyperparameters.json").read_text())
size = int(hp.get("input_size", 16))
shards = Path(os.environ["SM_CHANNEL_SHARDS"])
index = json.loads((shards / "index.json").read_text())
manifest = pq.read_table(Path(os.environ["SM_CHANNEL_MANIFEST"]) / "manifest.parquet")


def split(name):
    xs, ys = [], []
    for shard in index["splits"][name]["shards"]:
        with tarfile.open(shards / shard["key"]) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for m in sorted(members):
                if m.endswith(".json"):
                    continue
                meta = json.loads(tar.extractfile(members[m.split(".")[0] + ".json"]).read())
                img = Image.open(io.BytesIO(tar.extractfile(members[m]).read())).convert("L")
                xs.append(np.asarray(img.resize((size, size), Image.BOX), np.float32) / 255)
                ys.append(meta["label"])
    return np.stack(xs).reshape(len(xs), -1), ys


def log(line):
    if not hp.get("dagster_pipes_context"):
        print(line)
        return
    import dagster_pipes as dp

    raw = {k.upper(): hp[k] for k in ("dagster_pipes_context", "dagster_pipes_messages")}
    if "bucket" in dp.decode_param(raw["DAGSTER_PIPES_CONTEXT"]):
        import boto3

        s3 = boto3.client("s3")
        loader, writer = dp.PipesS3ContextLoader(s3), dp.PipesS3MessageWriter(s3, interval=0.2)
    else:
        loader, writer = dp.PipesDefaultContextLoader(), dp.PipesDefaultMessageWriter()
    with dp.open_dagster_pipes(
        params_loader=dp.PipesMappingParamsLoader(raw), context_loader=loader, message_writer=writer
    ) as pipes:
        pipes.log.info(line)


x, y = split("train")
classes = sorted(set(y))
centroids = np.stack([x[[c == k for c in y]].mean(0) for k in classes])
# logits = -|x - c|^2 + |x|^2 = 2 x.c - |c|^2: one MatMul and one Add
weights = (2 * centroids.T).astype(np.float32)
bias = -(centroids**2).sum(1).astype(np.float32)
tx, ty = split("test")
pred = np.argmax(tx @ weights + bias, 1)
accuracy = float(np.mean([classes[p] == t for p, t in zip(pred, ty, strict=True)]))
graph = helper.make_graph(
    [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["scores"]),
        helper.make_node("Add", ["scores", "b"], ["logits"]),
    ],
    "centroids",
    [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size])],
    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(classes)])],
    [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
out = Path(os.environ["SM_MODEL_DIR"])
out.mkdir(parents=True, exist_ok=True)
onnx.save(model, out / "model.onnx")
counts = {s: index["splits"][s]["count"] for s in ("train", "val", "test")}
(out / "metrics.json").write_text(
    json.dumps(
        {
            "classes": classes,
            "preprocess": {"size": size, "channels": 1, "mean": [0.0], "std": [1.0]},
            "counts": counts,
            "test_accuracy": accuracy,
            "history": [{"epoch": 1, "train_loss": 0.0, "val_loss": 0.0, "val_accuracy": accuracy}],
            "best_epoch": 1,
            "manifest_rows": manifest.num_rows,
        }
    )
)
log(f"centroids of {len(classes)} classes from {len(x)} images; test accuracy {accuracy:.4f}")
