"""MLLM data generation: TDE template captions and MUVA part grounding, against any OpenAI-compatible server.

  templates.py    the template bank (46 built in), the static instruction, template checks, the LLM dialogue
  client.py       OpenAI-compatible chat-completions client (base64 images, retries with backoff)
  hf_backend.py   local transformers backend (AutoProcessor + AutoModelForImageTextToText, batched)
  store.py        append-only JSONL outputs: torn-line repair, done set, batched flush, file lock
  runner.py       the concurrent, resumable loop over a folder of images; progress and summary
  captioner.py    caption jobs (static / template), leak and empty checks
  boxes.py        box parsing (0-1000 integers, <box> tags, JSON, 0-1 floats, pixels)
  grounding.py    grounding jobs -> parts.jsonl, calibrated by reid_jax/data/box_calibration.py
  mock_server.py  a local OpenAI-compatible server answering from the synthetic pedestrians' ground truth
  bench.py        the captioner's own overhead per image

CLI: `python -m reid_jax.captioning templates|caption|ground --help`.
"""
