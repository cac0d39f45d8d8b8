"""`blip2-serve batch` (#14): a Ray Data job on the suite's Ray over tiny real checkpoints. Captions equal
transformers' generate, unreadable images are rows with an error, reruns do only what is missing (Parquet and JSONL,
a kill mid-line included), embeddings equal the retrieval model's, and the CLI, killed mid-job on the suite's cluster,
resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import Reference, image_bytes

pytest.importorskip("pyarrow")
MAX_NEW_TOKENS = 6


def _collection(root, indices, start=0):
    """PNG files in nested folders, a broken .jpg and a text file that is not an image."""
    paths = {}
    for index in indices:
        folder = root / ("a" if index % 2 else "b") / "c"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{index:03d}.png"
        path.write_bytes(image_bytes(500 + index))
        paths[os.path.relpath(path, root)] = path
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return paths


def _job(task, source, checkpoint, out, **extra):
    from blip2_serve.serve.batch import BatchJob

    return BatchJob(
        task=task, source=str(source), checkpoint=str(checkpoint), out=str(out), device="cpu", dtype="fp32", **extra
    )


def _parquet_rows(out) -> list[dict]:
    import pyarrow.parquet

    return [row for part in sorted(out.glob("part-*.parquet")) for row in pyarrow.parquet.read_table(part).to_pylist()]


def test_batch_captions_a_folder_as_generate_does_and_resumes(tmp_path, checkpoints, references, serve_ports):
    from blip2_serve.serve.batch import run_batch

    images = tmp_path / "images"
    paths = _collection(images, range(5))
    out = tmp_path / "captions"
    job = _job("caption", images, checkpoints["opt"], out, max_new_tokens=MAX_NEW_TOKENS)

    first = run_batch(job, progress=False)
    rows = {row["id"]: row for row in _parquet_rows(out)}
    assert (first.written, first.errors, first.skipped) == (6, 1, 0)
    assert set(rows) == set(paths) | {"broken.jpg"}  # the text file is not listed
    assert rows["broken.jpg"]["text"] is None and "image" in rows["broken.jpg"]["error"].lower()
    reference: Reference = references["opt"]
    ordered = sorted(paths)
    expected = reference.generate([paths[i].read_bytes() for i in ordered], None, max_new_tokens=MAX_NEW_TOKENS)
    for image_id, tokens in zip(ordered, expected):
        assert rows[image_id]["error"] is None
        assert rows[image_id]["text"] == reference.text(tokens)
        assert (rows[image_id]["max_new_tokens"], rows[image_id]["num_beams"]) == (MAX_NEW_TOKENS, 1)
        assert rows[image_id]["image"] == str(paths[image_id])

    more = _collection(images, range(5, 7))
    second = run_batch(job, progress=False)
    assert (second.written, second.skipped) == (2, 6)
    again = _parquet_rows(out)
    assert sorted(r["id"] for r in again) == sorted(set(paths) | set(more) | {"broken.jpg"})
    assert not list(out.glob("*.partial"))
    import pyarrow.parquet

    whole = pyarrow.parquet.read_table(out)  # the folder reads as one typed table (the 2nd part has no error text)
    assert whole.num_rows == 8 and str(whole.schema.field("error").type) == "string"
    assert str(whole.schema.field("max_new_tokens").type) == "int64"


def test_batch_jsonl_manifest_questions_and_a_kill_mid_line(tmp_path, checkpoints, references, serve_ports):
    from blip2_serve.clients.contract import question_prompt
    from blip2_serve.serve.batch import run_batch

    folder = tmp_path / "pictures"
    folder.mkdir()
    manifest = tmp_path / "manifest.jsonl"
    lines = []
    for index in range(3):
        path = folder / f"p{index}.png"
        path.write_bytes(image_bytes(600 + index))
        lines.append({"id": f"pic-{index}", "image": str(path)} | ({"prompt": "a photo of"} if index == 2 else {}))
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    questions = (question_prompt("what is it?"), question_prompt("which colour?"))
    out = tmp_path / "answers.jsonl"
    job = _job("caption", manifest, checkpoints["t5"], out, prompts=questions, max_new_tokens=MAX_NEW_TOKENS)

    assert run_batch(job, progress=False).written == 5  # two questions for each of two rows, one own prompt
    written = [json.loads(line) for line in out.read_text().splitlines()]
    asked = {(r["id"], r["prompt"]): r["text"] for r in written}
    assert set(asked) == {(f"pic-{i}", q) for i in range(2) for q in questions} | {("pic-2", "a photo of")}
    reference: Reference = references["t5"]
    (tokens,) = reference.generate([(folder / "p1.png").read_bytes()], [questions[1]], max_new_tokens=MAX_NEW_TOKENS)
    assert asked[("pic-1", questions[1])] == reference.text(tokens)

    # A kill while writing: the last two lines lost, half of one left behind
    kept = out.read_text().splitlines(keepends=True)[:-2]
    out.write_text("".join(kept) + '{"id": "pic-')
    resumed = run_batch(job, progress=False)
    assert (resumed.written, resumed.skipped) == (2, 3)
    final = [json.loads(line) for line in out.read_text().splitlines()]  # every line whole JSON
    assert sorted((r["id"], r["prompt"]) for r in final) == sorted((r["id"], r["prompt"]) for r in written)


def test_batch_embed_equals_the_retrieval_model(tmp_path, itm_checkpoint, serve_ports):
    from blip2_serve.deployments.config import ModelConfig
    from blip2_serve.deployments.retrieval_model import RetrievalModel
    from blip2_serve.serve.batch import run_batch
    from PIL import Image

    images = tmp_path / "images"
    paths = _collection(images, range(3))
    out = tmp_path / "vectors"
    summary = run_batch(_job("embed", images, itm_checkpoint, out), progress=False)
    assert (summary.written, summary.errors) == (4, 1)
    rows = {row["id"]: row for row in _parquet_rows(out)}
    model = RetrievalModel.load(ModelConfig(checkpoint=str(itm_checkpoint), device="cpu"))
    ordered = sorted(paths)
    expected = model.embed_images(model.pixel_values([Image.open(paths[i]).convert("RGB") for i in ordered]))
    got = np.array([rows[i]["embedding"] for i in ordered], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert rows["broken.jpg"]["embedding"] is None and rows["broken.jpg"]["error"]
    import pyarrow.parquet

    assert str(pyarrow.parquet.read_table(out).schema.field("embedding").type) == "list<element: float>"


def _command(source, checkpoint, out, *extra) -> list[str]:
    import ray

    command = [sys.executable, "-m", "blip2_serve.serve.cli", "batch", "caption", str(source), "--model"]
    command += [str(checkpoint), "--out", str(out), "--address", ray.get_runtime_context().gcs_address]
    return command + ["--device", "cpu", "--dtype", "fp32", *extra]


def test_a_killed_batch_command_resumes_with_each_image_once(tmp_path, checkpoints, serve_ports):
    """The CLI against the suite's cluster (--address), dying right after its first batch is on disk, then the same
    command again: every image exactly once, in photos of mixed formats."""
    from blip2_serve.deployments.faults import DIE_AFTER_ENV

    images = tmp_path / "photos"
    images.mkdir()
    for index in range(40):
        fmt = ("PNG", "JPEG", "WEBP")[index % 3]
        (images / f"photo{index:02d}.{fmt.lower()}").write_bytes(image_bytes(700 + index, (96, 128), fmt))
    out = tmp_path / "parts"
    command = _command(images, checkpoints["opt"], out, "--quiet")
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    # Killed after its first batch is on disk (deployments/faults.py: os._exit, no cleanup, as SIGKILL)
    killed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env | {DIE_AFTER_ENV: "1"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    before = len(_parquet_rows(out))
    assert before == 16 and "rows written" not in killed.stdout

    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{40 - before} rows written" in done.stdout and f"{before} of 40 were already there" in done.stdout
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    ids = [row["id"] for row in _parquet_rows(out)]
    assert sorted(ids) == sorted(p.name for p in images.iterdir())  # each image exactly once
    assert not any(row["error"] for row in _parquet_rows(out))
