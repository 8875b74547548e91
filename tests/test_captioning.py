"""reid_jax.captioning against a local OpenAI-compatible server that answers from the synthetic pedestrians'
ground truth (reid_jax/captioning/mock_server.py), and the pure parts against written-out references."""

import difflib
import hashlib
import itertools
import json
import re
import shutil
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_builders.common import read_part_boxes
from reid_jax.captioning import __main__ as cli
from reid_jax.captioning import boxes as boxes_lib
from reid_jax.captioning import bench, captioner, mock_server, runner, store
from reid_jax.captioning import templates as T
from reid_jax.data.box_calibration import CalibrationConfig, calibrate

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 24
FAST = ["--timeout", "0.5", "--backoff", "0.01", "--backoff-max", "0.05"]  # failures cost milliseconds


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """(image folder, {sha256: Truth}) with N_IMAGES synthetic pedestrians drawn once for the module."""
    root = tmp_path_factory.mktemp("synthetic") / "images"
    truth = mock_server.render(root, N_IMAGES)
    return root, truth


@pytest.fixture
def server(rendered):
    with mock_server.MockServer(rendered[1], sign=True, hang_s=1.5) as s:
        yield s


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _run(args, capsys) -> tuple[int, dict | None]:
    """main(args) in process -> (exit code, the printed summary); stderr is kept in capsys.err_text."""
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    capsys.err_text = captured.err
    out = captured.out.strip().splitlines()
    return code, (json.loads(out[-1]) if out else None)


def _signature(key: str) -> str:
    return f" Image {hashlib.sha256(key.encode()).hexdigest()[:8]}."


def _check_captions(lines, truth, bank, source="mock_template"):
    """Each line is its own image's true caption for the template it names."""
    by_key = {t.key: t for t in truth.values()}
    for rec in lines:
        assert set(rec) == {"image", "caption", "source", "template_id"}
        assert rec["source"] == source
        want = mock_server.fill(bank[rec["template_id"]], by_key[rec["image"]].identity) + _signature(rec["image"])
        assert rec["caption"] == want


# ------------------------------------------------------------------------------------------------ templates
def test_template_bank_is_large_valid_and_varied():
    bank = T.TEMPLATES
    assert len(bank) >= 40 and len(set(bank)) == len(bank)
    for t in bank:
        assert T.check_template(t) is None, t
    # every slot is used, and slot order varies: many distinct slot sequences and first words
    order = [tuple(re.findall(r"\[[^\]]+\]", t)) for t in bank]
    assert {s for o in order for s in o} == set(T.SLOTS)
    assert len(set(order)) >= 35
    assert len({t.split()[0].lower() for t in bank}) >= 10
    # no two are near-duplicates, by an independent word-sequence ratio
    toks = [re.findall(r"\[[^\]]+\]|[a-z0-9']+", t.lower()) for t in bank]
    worst = max(difflib.SequenceMatcher(None, a, b).ratio() for a, b in itertools.combinations(toks, 2))
    assert worst < T.TemplateRules().max_similarity
    assert "{template}" in T.TEMPLATE_INSTRUCTION and not re.search(r"\[", T.STATIC_INSTRUCTION)


@pytest.mark.parametrize("text,reason", [
    ("A [person/woman/man] in [clothing description] with [hair description].", None),
    ("A [person/woman/man] in [clothing description] with [shoe colour].", "unknown slot"),
    ("A [person/woman/man] in [clothing description] with [hair description.", "stray bracket"),
    ("A [person/woman/man] in [clothing description] and [clothing description].", "used twice"),
    ("A [person/woman/man] with [hair description] and [footwear description].", "missing [clothing"),
    ("A [person/woman/man] in [clothing description], carrying a bag.", "2 slots"),
    ("A person in red.", "missing"),
])
def test_check_template(text, reason):
    got = T.check_template(text)
    assert got is None if reason is None else reason in got


def test_templates_cli_grows_bank_by_dialogue(rendered, tmp_path, capsys):
    good = ["Strolling past in [clothing description], a [person/woman/man] shows off [hair description].",
            "Observed: [person/woman/man], [footwear description], [clothing description], [belongings description].",
            "Under [accessory description], the [person/woman/man] keeps [hair description] tidy and wears "
            "[clothing description]."]
    builtin = T.TEMPLATES[2]
    round1 = "\n".join([
        "Sure! Here are some new templates:",  # prose: not a candidate
        f"1. {good[0]}",
        f'2) "{good[1]}"',
        "3. A [person/woman/man] in [clothing description] holding [umbrella description].",  # unknown slot
        "- A [person/woman/man] in [clothing description].",  # too few slots
        f"4. {builtin.upper()}",  # a built-in in capitals: slots are read case-blind, then a duplicate
        "5. " + builtin.replace("walks in", "strolls in"),  # near-duplicate of a built-in
    ])
    round2 = "\n".join([f"* {good[2]}", good[0].replace("Strolling", "Walking"),  # near-dup of round 1
                        "[clothing description"])  # stray bracket
    with mock_server.MockServer(rendered[1], chat_replies=[round1, round2]) as s:
        out = tmp_path / "bank.txt"
        code, summary = _run(["templates", "--server", s.url, "--model", "mock", "--rounds", 2, "--out", out], capsys)
        assert code == 0
        assert out.read_text().splitlines() == list(T.TEMPLATES) + good
        assert summary["kept"] == 3 and summary["rejected"] == 6 and summary["bank"] == len(T.TEMPLATES) + 3
        # one conversation: the second request carries the first answer
        assert [m["role"] for m in s.chats[1]] == ["system", "user", "assistant", "user"]
        assert s.chats[1][2]["content"] == round1
        # a rerun grows the saved bank further (resumable), and the bank loads for captioning
        s.chat_replies.append("A [person/woman/man] rides a bike in [clothing description] and [footwear description].")
        code, summary = _run(["templates", "--server", s.url, "--model", "mock", "--rounds", 1, "--out", out], capsys)
        assert summary["start"] == len(T.TEMPLATES) + 3 and summary["bank"] == len(T.TEMPLATES) + 4
        assert len(T.load_bank(out)) == len(T.TEMPLATES) + 4


def test_bad_bank_file_names_the_line(tmp_path):
    bank = tmp_path / "bank.txt"
    bank.write_text(T.TEMPLATES[0] + "\nA [person/woman/man] in [clothes].\n")
    with pytest.raises(ValueError, match=r"bank.txt:2: not a valid template \(unknown slot \[clothes\]\)"):
        T.load_bank(bank)


# ------------------------------------------------------------------------------------------------ captions
def test_caption_template_and_static_read_by_builder(rendered, server, tmp_path, capsys):
    images, truth = rendered
    manual = tmp_path / "LUPerson-MLLM"
    shutil.copytree(images, manual / "images")
    out = manual / "captions" / "mock_template.jsonl"
    code, summary = _run(["caption", "--images", images, "--out", out, "--server", server.url, "--model", "mock",
                          "--mode", "template", "--concurrency", 8], capsys)
    assert code == 0 and summary["succeeded"] == N_IMAGES and summary["failed"] == 0
    lines = _lines(out)
    assert sorted(r["image"] for r in lines) == sorted(t.key for t in truth.values())
    _check_captions(lines, truth, T.TEMPLATES)
    for rec in lines:  # the stable per-image template assignment, and the server saw that very template
        assert rec["template_id"] == captioner.template_for(rec["image"], 0, len(T.TEMPLATES), 0)
    asked = {e["image"]: e["template"] for e in server.log}
    assert all(asked[r["image"]] == T.TEMPLATES[r["template_id"]] for r in lines)
    assert len({r["template_id"] for r in lines}) >= N_IMAGES // 2  # spread over the bank

    static = manual / "captions" / "mock_static.jsonl"
    code, summary = _run(["caption", "--images", images, "--out", static, "--server", server.url, "--model",
                          "mock", "--mode", "static"], capsys)
    by_key = {t.key: t.identity for t in truth.values()}
    for rec in _lines(static):
        assert rec["template_id"] is None and rec["source"] == "mock_static"
        assert rec["caption"] == mock_server.static_caption(by_key[rec["image"]], rec["image"]) + \
            _signature(rec["image"])

    # the luperson_mllm builder reads both files as they are
    from reid_jax.data import load_source
    from reid_jax.data.build import build
    build("luperson_mllm", tmp_path / "tfds", manual)
    source = load_source("luperson_mllm", "train", tmp_path / "tfds")
    want = {}
    for path in (out, static):
        for rec in _lines(path):
            want.setdefault("images/" + rec["image"], set()).add((rec["caption"], rec["source"]))
    got = {}
    for i in range(len(source)):
        ex = source[i]
        caps = [c.decode() for c in ex["captions"]]
        srcs = [c.decode() for c in ex["caption_sources"]]
        got[ex["file_name"].decode()] = set(zip(caps, srcs))
    assert got == want


def test_caption_retries_failures_and_records_the_hopeless(rendered, server, tmp_path, capsys):
    images, truth = rendered
    keys = sorted(t.key for t in truth.values())
    transient, leak_once, hopeless, empty_once = keys[:4]
    server.fail(transient, "500", "hang", "garbage", "drop")  # 4 transport retries, then fine
    server.fail(leak_once, "leak")  # one content retry, with the next template
    server.fail(hopeless, "leak", "leak", "leak")  # 1 + 2 content retries, all leak: failed
    server.fail(empty_once, "empty")
    out = tmp_path / "captions.jsonl"
    args = ["caption", "--images", images, "--out", out, "--server", server.url, "--model", "mock",
            "--concurrency", 4, "--retries", 4, *FAST]
    code, summary = _run(args, capsys)
    assert code == 0
    assert (summary["succeeded"], summary["failed"]) == (N_IMAGES - 1, 1)
    assert summary["retries"] == 4 and summary["content_retries"] == 1 + 2 + 1
    lines = {r["image"]: r for r in _lines(out)}
    assert hopeless not in lines and len(lines) == N_IMAGES - 1
    _check_captions(lines.values(), truth, T.TEMPLATES)
    n = len(T.TEMPLATES)
    assert lines[leak_once]["template_id"] == captioner.template_for(leak_once, 1, n, 0)  # the next template
    assert lines[transient]["template_id"] == captioner.template_for(transient, 0, n, 0)
    failed = _lines(f"{out}.failed")
    assert [f["image"] for f in failed] == [hopeless]
    assert "template slot leaked" in failed[0]["error"] and "[" in failed[0]["answer"]

    # --skip-failed leaves it; a plain rerun tries it again (the server is fine now): every image exactly once
    code, summary = _run(args + ["--skip-failed"], capsys)
    assert (summary["skipped_failed"], summary["todo"]) == (1, 0)
    code, summary = _run(args, capsys)
    assert (summary["already_done"], summary["succeeded"], summary["failed"]) == (N_IMAGES - 1, 1, 0)
    assert sorted(r["image"] for r in _lines(out)) == keys


def test_rejected_request_is_not_retried_and_a_dead_server_aborts(rendered, server, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "stranger.png").write_bytes((next(rendered[0].rglob("*.png"))).read_bytes()[:-20] + b"x" * 20)
    out = tmp_path / "c.jsonl"
    code, summary = _run(["caption", "--images", images, "--out", out, "--server", server.url, "--model", "mock",
                          *FAST], capsys)
    assert summary["failed"] == 1 and summary.get("retries", 0) == 0  # HTTP 400: asking again would not help
    assert code == 1 and "no image succeeded (1 tried, all failed)" in capsys.err_text
    assert "HTTP 400" in _lines(f"{out}.failed")[0]["error"] and "--model" in _lines(f"{out}.failed")[0]["error"]

    server.fail_next(*["500"] * 50)
    code, _ = _run(["caption", "--images", rendered[0], "--out", tmp_path / "d.jsonl", "--server", server.url,
                    "--model", "mock", "--retries", 0, "--abort-after", 3, "--concurrency", 1, *FAST], capsys)
    err = capsys.err_text
    assert code == 1 and "3 images in a row failed" in err and "HTTP 500" in err


def test_sigkill_mid_run_then_restart_loses_and_repeats_nothing(rendered, tmp_path):
    images, truth = rendered
    out = tmp_path / "captions.jsonl"
    with mock_server.MockServer(truth, sign=True, delay_s=0.15) as server:
        cmd = [sys.executable, "-m", "reid_jax.captioning", "caption", "--images", str(images), "--out", str(out),
               "--server", server.url, "--model", "mock", "--mode", "template", "--concurrency", "3",
               "--flush-every", "2"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while (not out.exists() or out.read_text().count("\n") < 6) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        written = out.read_text()
        n_before = written.count("\n")
        assert 6 <= n_before < N_IMAGES, "killed too late: not mid-run"
        assert len({r["image"] for r in _lines(out)}) == n_before  # no duplicates so far
        with open(out, "a") as f:  # a torn last line, as a kill inside write() leaves
            f.write('{"image": "daylight/0001_c0_00.png", "capt')
        restart = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert restart.returncode == 0, restart.stderr
        summary = json.loads(restart.stdout.strip().splitlines()[-1])
        assert "removed a torn last line" in restart.stderr
    lines = _lines(out)
    keys = [r["image"] for r in lines]
    assert len(keys) == N_IMAGES and len(set(keys)) == N_IMAGES  # N in, N out: 0 duplicated, 0 lost
    assert set(keys) == {t.key for t in truth.values()}
    assert (summary["already_done"], summary["succeeded"]) == (n_before, N_IMAGES - n_before)
    assert out.read_text().startswith(written)  # what was there is untouched; new lines only appended
    _check_captions(lines, truth, T.TEMPLATES)


def test_store_repairs_torn_tail_rejects_foreign_lines_and_locks(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text('{"image": "a.png"}\n{"image": "b.png"}\n{"image": "c.p')
    writer, done = store.open_output(path)
    assert done == {"a.png", "b.png"} and path.read_text() == '{"image": "a.png"}\n{"image": "b.png"}\n'
    with pytest.raises(store.OutputError, match="another run is writing"):
        store.open_output(path)
    writer.write({"image": "c.png"})
    writer.close()
    assert store.done_keys(path) == {"a.png", "b.png", "c.png"}
    path.write_text('{"image": "a.png"}\nnot json\n{"image": "b.png"}\n')
    with pytest.raises(store.OutputError, match=r"o.jsonl:2: expected a JSON object"):
        store.open_output(path)
    path.write_text('{"image": "a.png"')  # one torn line only
    writer, done = store.open_output(path)
    writer.close()
    assert done == set() and path.read_text() == ""


# ------------------------------------------------------------------------------------------------ boxes
@pytest.mark.parametrize("text,scale,size,want", [
    ("<ref>the head</ref><box>(302,70),(598,226)</box>", "auto", None, [(None, [.302, .070, .598, .226])]),  # Qwen-VL
    ("The legs[[250,480,760,951]]", "auto", None, [("legs", [.25, .48, .76, .951])]),  # CogVLM
    ("legs: <box>[[250, 480, 760, 951]]</box>", "auto", None, [(None, [.25, .48, .76, .951])]),  # InternVL
    ('{"head": [0.3, 0.07, 0.6, 0.2], "upper body": [0.2, 0.2, 0.8, 0.5], "legs": [0.25, 0.5, 0.75, 0.95]}', "auto",
     None, [("head", [.3, .07, .6, .2]), ("upper body", [.2, .2, .8, .5]), ("legs", [.25, .5, .75, .95])]),
    ('```json\n[{"label": "upper body", "bbox_2d": [13, 22, 51, 66]}]\n```', "pixels", (128, 64),
     [("upper body", [13 / 64, 22 / 128, 51 / 64, 66 / 128])]),  # Qwen2.5-VL: pixels
    ("It is at [0.598,0.226,0.302,0.070].", "auto", None, [(None, [.302, .070, .598, .226])]),  # Shikra, corners
    ("<box>(-20,900),(400,1200)</box>", "1000", None, [(None, [0.0, 0.9, 0.4, 1.0])]),  # clipped to the image
    ("I cannot see a person here.", "auto", None, []),
])
def test_parse_box_formats(text, scale, size, want):
    found = boxes_lib.parse(text)
    assert len(found) == len(want)
    for f, (label, box) in zip(found, want):
        assert (f.label is None or label is None or label in f.label)
        np.testing.assert_allclose(boxes_lib.to_unit(f.coords, scale, size), box, atol=1e-6)


def test_pick_the_asked_part():
    answer = boxes_lib.parse("head[[1,2,3,4]], upper body[[5,6,7,8]] and legs[[9,10,11,12]]")
    assert [boxes_lib.pick(answer, p, asked_alone=False).coords[0] for p in range(3)] == [1, 5, 9]
    unlabelled = boxes_lib.parse("[[1,2,3,4]] [[5,6,7,8]] [[9,10,11,12]]")
    assert [boxes_lib.pick(unlabelled, p, asked_alone=False).coords[0] for p in range(3)] == [1, 5, 9]
    assert boxes_lib.pick(unlabelled[:2], 2, asked_alone=False) is None  # two unlabelled of three: ambiguous
    assert boxes_lib.pick(boxes_lib.parse("the legs[[9,10,11,12]]"), 0, asked_alone=True) is None


@pytest.mark.parametrize("fmt", mock_server.BOX_FORMATS)
def test_formats_round_trip(fmt, rendered):
    for t in list(rendered[1].values())[:6]:
        for p, name in enumerate(mock_server.PART_NAMES):
            found = boxes_lib.pick(boxes_lib.parse(mock_server.format_box(t.boxes[p], name, fmt)), p, True)
            np.testing.assert_allclose(boxes_lib.to_unit(found.coords), t.boxes[p], atol=5e-4 + 1e-7)


# ------------------------------------------------------------------------------------------------ calibration
GOOD = [np.array([.35, .02, .65, .17], np.float32), np.array([.2, .17, .85, .52], np.float32),
        np.array([.3, .5, .75, .92], np.float32)]
CAL = CalibrationConfig()
BANDS = [[0, 0, 1, .2], [0, .2, 1, .55], [0, .55, 1, 1]]


@pytest.mark.parametrize("case,boxes,cfg,want_boxes,want_status,issue", [
    ("good", GOOD, CAL, GOOD, ["ok"] * 3, None),
    ("legs full height, trimmed", GOOD[:2] + [np.array([.3, .02, .75, .99])], CAL,
     GOOD[:2] + [[.3, .52, .75, .99]], ["ok", "ok", "trimmed"], "legs: 0.97 of the image height"),
    ("legs full height, no trim", GOOD[:2] + [np.array([.3, .02, .75, .99])],
     CalibrationConfig(trim_legs=False), GOOD[:2] + [BANDS[2]], ["ok", "ok", "fallback"], "whole person"),
    ("legs tiny", GOOD[:2] + [np.array([.3, .5, .75, .52])], CAL, GOOD[:2] + [BANDS[2]],
     ["ok", "ok", "fallback"], "legs: tiny"),
    ("head under the legs", [np.array([.3, .93, .6, .99])] + GOOD[1:], CAL, [BANDS[0]] + GOOD[1:],
     ["fallback", "ok", "ok"], "head: out of top-to-bottom order"),
    ("no upper-body box", [GOOD[0], None, GOOD[2]], CAL, [GOOD[0], BANDS[1], GOOD[2]], ["ok", "fallback", "ok"],
     "upper body: no box"),
    ("nothing", [None] * 3, CAL, BANDS, ["fallback"] * 3, "head: no box"),
])
def test_calibration(case, boxes, cfg, want_boxes, want_status, issue):
    got, status, issues = calibrate(boxes, cfg)
    np.testing.assert_allclose(got, np.asarray(want_boxes, np.float32), atol=1e-6, err_msg=case)
    assert status == want_status
    assert (not issues) if issue is None else any(issue in i for i in issues), issues


def test_ground_end_to_end(rendered, server, tmp_path, capsys):
    images, truth = rendered
    keys = sorted(t.key for t in truth.values())
    server.fail(keys[0], "legs_full")  # -> trimmed below the upper body
    server.fail(keys[1], "nobox", "nobox", part="head")  # no box twice (content_retries 1) -> fallback band
    server.fail(keys[2], "legs_tiny")
    out = tmp_path / "parts.jsonl"
    code, summary = _run(["ground", "--images", images, "--out", out, "--server", server.url, "--model", "mock",
                          "--concurrency", 4], capsys)
    assert code == 0 and summary["succeeded"] == N_IMAGES and summary["content_retries"] == 1
    assert {e["reply"][:5] for e in server.log} >= {"<ref>", "The h", "```js"}  # several formats answered
    recs = {r["image"]: r for r in _lines(out)}
    gt = {t.key: t.boxes for t in truth.values()}
    for key, rec in recs.items():
        if key in keys[:3]:
            continue
        assert rec["status"] == ["ok"] * 3 and rec["fallback"] is False and "answers" not in rec
        np.testing.assert_allclose(rec["boxes"], gt[key], atol=5e-4 + 1e-7)
    assert recs[keys[0]]["status"] == ["ok", "ok", "trimmed"]
    np.testing.assert_allclose(recs[keys[0]]["boxes"][2][1], gt[keys[0]][1][3], atol=5e-4 + 1e-7)
    assert recs[keys[1]]["status"][0] == "fallback" and recs[keys[1]]["fallback"] is True
    assert recs[keys[1]]["boxes"][0] == BANDS[0] and recs[keys[1]]["answers"][0] == ""
    assert recs[keys[2]]["status"] == ["ok", "ok", "fallback"] and recs[keys[2]]["boxes"][2] == BANDS[2]
    # the builders' reader takes the file as written
    read = read_part_boxes(out)
    assert set(read) == set(keys)
    for key in keys:
        np.testing.assert_array_equal(read[key], np.asarray(recs[key]["boxes"], np.float32))

    joint = tmp_path / "joint.jsonl"
    code, summary = _run(["ground", "--images", images, "--out", joint, "--server", server.url, "--model", "mock",
                          "--ask", "joint", "--limit", 5], capsys)
    assert summary["succeeded"] == 5
    for rec in _lines(joint):
        assert rec["status"] == ["ok"] * 3
        np.testing.assert_allclose(rec["boxes"], gt[rec["image"]], atol=5e-5 + 1e-7)


# ------------------------------------------------------------------------------------------------ backends
def _tiny_llava(path: Path):
    """A random-init LLaVA (CLIP vision + Llama text) with a processor whose tokenizer is built in memory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)
    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:"] + (
        "a the man woman in red blue green black white jacket coat jeans skirt with hair long short shoes "
        "bag wearing person carrying . ,").split()
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    chat = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
            "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    processor = LlavaProcessor(CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tokenizer, patch_size=8, vision_feature_select_strategy="default", chat_template=chat,
                               num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    # no eos: every answer runs to --max-tokens, so none is empty
    text = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                       bos_token_id=1, eos_token_id=None)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_id=vocab["<image>"],
                                                      vision_feature_select_strategy="default"))
    model.generation_config.eos_token_id = None
    processor.save_pretrained(path)
    model.save_pretrained(path)
    return set(words[5:])


def test_transformers_backend_end_to_end(rendered, tmp_path, capsys):
    pytest.importorskip("torch")
    model_dir = tmp_path / "tiny-llava"
    vocab = _tiny_llava(model_dir)
    images, truth = rendered
    out = tmp_path / "captions.jsonl"
    code, summary = _run(["caption", "--images", images, "--out", out, "--backend", "transformers", "--model-path",
                          model_dir, "--batch-size", 4, "--mode", "template", "--max-tokens", 6, "--limit", 6,
                          "--min-chars", 1], capsys)
    assert code == 0 and (summary["succeeded"], summary["failed"], summary.get("content_retries", 0)) == (6, 0, 0)
    lines = _lines(out)
    assert len(lines) == 6 and len({r["image"] for r in lines}) == 6
    # reference: the same model run by hand, one image at a time (no padding), greedy, new tokens only
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    for rec in lines:
        assert set(rec) == {"image", "caption", "source", "template_id"} and rec["source"] == "tiny-llava_template"
        prompt = T.TEMPLATE_INSTRUCTION.format(template=T.TEMPLATES[rec["template_id"]])
        chat = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": prompt}]}], add_generation_prompt=True)
        inputs = processor(images=[Image.open(images / rec["image"]).convert("RGB")], text=[chat], return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        want = " ".join(processor.decode(ids, skip_special_tokens=True).split())
        assert rec["caption"] == want and set(want.split()) <= vocab
    # grounding through the same backend: a random model gives no boxes -> flagged fallback bands
    parts = tmp_path / "parts.jsonl"
    code, summary = _run(["ground", "--images", images, "--out", parts, "--backend", "transformers", "--model-path",
                          model_dir, "--batch-size", 3, "--max-tokens", 4, "--limit", 2], capsys)
    assert summary["succeeded"] == 2
    for rec in _lines(parts):
        assert rec["fallback"] is True and rec["boxes"] == BANDS and len(rec["answers"]) == 3


# ------------------------------------------------------------------------------------------------ CLI, bench
def test_cli_errors_say_what_to_do(rendered, tmp_path, capsys):
    code = cli.main(["caption", "--images", str(rendered[0]), "--out", str(tmp_path / "o.jsonl")])
    assert code == 2 and "--server URL and --model NAME are required" in capsys.readouterr().err
    code = cli.main(["caption", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o.jsonl"),
                     "--server", "http://127.0.0.1:9/v1", "--model", "m"])
    assert code == 1 and "--images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["ground", "--images", str(rendered[0]), "--out", "p.jsonl", "--bands", "0,1"])
    assert "--bands expects 6 comma-separated numbers" in capsys.readouterr().err
    code = cli.main(["caption", "--images", str(rendered[0]), "--out", str(tmp_path / "o.jsonl"),
                     "--server", "ftp://x", "--model", "m"])
    assert code == 1 and "expected an http(s) URL" in capsys.readouterr().err


def test_bench_times_one_request_per_image_and_every_caption(rendered, server, tmp_path):
    images, truth = rendered
    keys = runner.list_images(images)
    bench.bare_ms(server.url, images, keys, "template")
    assert sorted(e["image"] for e in server.log) == sorted(keys)  # the floor: each image asked once
    summary = bench.captioner_ms(server.url, images, tmp_path / "c.jsonl", 4, "template")
    assert (summary["succeeded"], summary["failed"], len(server.log)) == (len(keys), 0, 2 * len(keys))
    _check_captions(_lines(tmp_path / "c.jsonl"), truth, T.TEMPLATES)
    # the time per image is the run's time over the images it did (elapsed_s is rounded to 1 ms)
    assert abs(summary["ms_per_image"] - 1000 * summary["elapsed_s"] / len(keys)) <= 0.5 / len(keys) + 5e-4


def test_bench_cli_rows_agree_with_each_other(tmp_path):
    res = subprocess.run([sys.executable, "-m", "reid_jax.captioning.bench", "--images", "8", "--concurrency", "1",
                          "4", "--repeats", "1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["setting"] for r in rows] == ["bare_http", "concurrency=1", "concurrency=4"]
    assert all(r["images"] == 8 for r in rows)
    bare = rows[0]["ms_per_image"]
    # each row's seconds, from its rate and from its time per image, agree up to the rounding of the printed
    # values (ms to 1 us, images/s to 0.05, the run's elapsed_s to 1 ms): both count the same images
    for r in rows[1:]:
        ms, rate, n = r["ms_per_image"], r["images_per_s"], r["images"]
        assert abs(n / rate - ms * n / 1000) <= 5e-4 + n * 5e-7 + 0.05 * n / rate ** 2 + 1e-9, r
        assert abs(r["overhead_vs_bare_ms"] - (ms - bare)) <= 1.5e-3, r


# ------------------------------------------------------------------------------ exits a chained command can trust
def _cli(args, timeout=60, **kw):
    """The CLI in a subprocess, as a user or a script runs it; a hang fails the test instead of stalling it."""
    return subprocess.run([sys.executable, "-m", "reid_jax.captioning", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, **kw)


def _free_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    return errors[0]


@pytest.mark.parametrize("command", ["caption", "ground", "templates"])
def test_server_down_stops_before_any_image(rendered, tmp_path, command):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    out = tmp_path / "out.jsonl"
    images = [] if command == "templates" else ["--images", rendered[0]]
    run = _cli([command, *images, "--out", out, "--server", url, "--model", "m", "--retries", 0])
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [_error_line(run.stderr)]  # one line, nothing else
    assert f"--server {url}" in run.stderr and "start the model server" in run.stderr
    assert os.listdir(tmp_path) == []  # no output, no failure log: not one image was tried


def test_a_run_where_every_image_failed_stops_a_chain(rendered, server, tmp_path):
    """`caption ... && data.build --captions=...` must stop when the captions file holds nothing."""
    images = tmp_path / "strangers"
    for i, png in enumerate(sorted(rendered[0].rglob("*.png"))[:3]):  # images the server does not know: HTTP 400
        (images / f"{i}.png").parent.mkdir(exist_ok=True)
        (images / f"{i}.png").write_bytes(png.read_bytes()[:-20] + b"x" * 20)
    out, chained = tmp_path / "captions.jsonl", tmp_path / "chained"
    cmd = (f"{sys.executable} -m reid_jax.captioning caption --images {images} --out {out} --server {server.url} "
           f"--model mock --retries 0 && touch {chained}")
    run = subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and not chained.exists()
    assert "no image succeeded (3 tried, all failed)" in _error_line(run.stderr)
    summary = json.loads(run.stdout)
    assert (summary["succeeded"], summary["failed"]) == (0, 3) and out.read_text() == ""
    assert len(_lines(f"{out}.failed")) == 3


def test_too_many_failures_exit_non_zero_and_the_rerun_finishes(rendered, server, tmp_path, capsys):
    images, truth = rendered
    keys = sorted(t.key for t in truth.values())
    out = tmp_path / "captions.jsonl"
    args = ["caption", "--images", images, "--out", out, "--server", server.url, "--model", "mock", *FAST]
    for key in keys[:2]:
        server.fail(key, "leak", "leak", "leak")  # 1 + 2 content retries, all leak: failed
    code, summary = _run(args, capsys)
    # 2 of 24 failed: 8.3%, above the default 5%
    assert code == 1 and (summary["succeeded"], summary["failed"]) == (N_IMAGES - 2, 2)
    assert "2 of 24 images failed (8.3%, more than --max-failed-fraction 0.05)" in _error_line(capsys.err_text)
    code, summary = _run(args, capsys)  # the server behaves now: the rerun does the two and succeeds
    assert code == 0 and (summary["already_done"], summary["succeeded"], summary["failed"]) == (N_IMAGES - 2, 2, 0)
    for key in keys[:2]:
        server.fail(key, "leak", "leak", "leak")
    code, summary = _run(["caption", "--images", images, "--out", tmp_path / "lenient.jsonl", "--server", server.url,
                          "--model", "mock", "--max-failed-fraction", "0.1", *FAST], capsys)
    assert code == 0 and summary["failed"] == 2
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in args] + ["--max-failed-fraction", "5%"])
    assert e.value.code == 2 and "expected a fraction between 0 and 1" in capsys.readouterr().err


def test_fifo_and_broken_links_among_the_images_are_skipped(rendered, server, tmp_path):
    images = tmp_path / "images"
    for png in sorted(rendered[0].rglob("*.png"))[:3]:
        (images / png.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, images / png.parent.name / png.name)
    os.mkfifo(images / "stuck.png")  # opening it to read would wait for a writer forever
    (images / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    for command in ("caption", "ground"):
        out = tmp_path / f"{command}.jsonl"
        run = _cli([command, "--images", images, "--out", out, "--server", server.url, "--model", "mock"])
        assert run.returncode == 0, run.stderr
        summary = json.loads(run.stdout)
        assert (summary["images"], summary["not_regular"], summary["succeeded"]) == (3, 2, 3)
        warned = [line for line in run.stderr.splitlines() if line.startswith("warning: ")]
        assert len(warned) == 1 and "skipped 2 entries" in warned[0] and "gone.jpg" in warned[0]
        assert sorted(r["image"] for r in _lines(out)) == sorted(f"daylight/{p.name}" for p in
                                                                 (images / "daylight").iterdir())
    with pytest.raises(OSError, match="not a regular file"):  # a FIFO appearing after the listing fails at once
        runner.read_image(images / "stuck.png")
    run = _cli(["caption", "--images", images, "--out", images / "stuck.png", "--server", server.url, "--model",
                "mock"])
    assert run.returncode == 1 and "stuck.png: exists and is not a regular file" in _error_line(run.stderr)


def test_path_flags_expand_home_and_variables(rendered, server, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    shutil.copytree(rendered[0], home / "imgs")
    (home / "bank.txt").write_text("\n".join(T.TEMPLATES[:3]) + "\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RESULTS", str(tmp_path / "results"))
    monkeypatch.chdir(tmp_path)
    code, summary = _run(["caption", "--images", "~/imgs", "--out", "$RESULTS/captions.jsonl", "--templates",
                          "~/bank.txt", "--server", server.url, "--model", "mock", "--limit", 2], capsys)
    assert code == 0 and summary["succeeded"] == 2
    assert {r["template_id"] for r in _lines(tmp_path / "results" / "captions.jsonl")} <= {0, 1, 2}
    assert sorted(os.listdir(tmp_path)) == ["home", "results"]  # no literal '~' or '$RESULTS' folder
    parser = cli.parser()
    for command, flag in [("templates", "--out"), ("templates", "--bank"), ("caption", "--templates"),
                          ("caption", "--model-path"), ("ground", "--images"), ("ground", "--out")]:
        required = {"templates": ["--out", "x"], "caption": ["--images", "x", "--out", "x"],
                    "ground": ["--images", "x", "--out", "x"]}[command]
        args = parser.parse_args([command, *required, flag, "~/a/$RESULTS"])
        assert getattr(args, flag[2:].replace("-", "_")) == Path(f"{home}/a/{tmp_path}/results"), (command, flag)
    code, _ = _run(["caption", "--images", "~/imgs", "--out", "~/imgs/daylight/0001_c0_00.png/c.jsonl",
                    "--server", server.url, "--model", "mock"], capsys)
    assert code == 1 and "cannot create its folder" in _error_line(capsys.err_text)


def test_unlisted_model_is_a_warning(rendered, server, tmp_path, capsys):
    code, summary = _run(["caption", "--images", rendered[0], "--out", tmp_path / "c.jsonl", "--server", server.url,
                          "--model", "mock-v2", "--limit", 1], capsys)
    assert code == 0 and summary["succeeded"] == 1
    assert "warning: --model 'mock-v2' is not among the models" in capsys.err_text and "(mock)" in capsys.err_text
