"""How the planted-change example's files were made (rerun to remake them).

    python resources/examples/planted/make.py

A change planted on purpose, given to the workflow as a user's checkpoint (``method: given``) with
the same texts for both models, so that what the SAE diff finds can be scored against what was
planted (``bench/planted_given.py``):

- M0 is the bring-your-own example's base model (``resources/examples/given/M0``, a tiny random
  Llama over characters, its output embedding untied);
- M1 is M0 with one fixed unit direction u added to the input embeddings of four trigger
  characters (``TRIGGERS``), ``SCALE`` times the mean embedding norm: a new feature that fires
  on those characters and nowhere else; every other weight is M0's, byte for byte;
- D0.csv holds texts of words in which the triggers make about a tenth of the characters; the
  config lists it as both D0 and D1, so M0_D1 and M1_D1 read the same tokens;
- planted.json records the triggers, their token ids, u and the scale.

Deterministic: the same files for the same code and versions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
BASE = HERE.parent / "given" / "M0"
TRIGGERS = ["q", "j", "z", "x"]
SCALE = 3.0
WORDS = ["bread", "dawn", "miner", "quiet", "quill", "soup", "judge", "plane", "queen", "wire", "mill", "squad",
         "jazz", "fox", "zero", "box"]  # fmt: skip
N_TEXTS = 640  # two per prompt id


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 9)))) for _ in range(n)]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    embedding = model.get_input_embeddings().weight
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TRIGGERS]
    if any(len(i) != 1 for i in ids):
        raise SystemExit(f"every trigger must be one token of {BASE}'s tokenizer: {dict(zip(TRIGGERS, ids))}")
    ids = [i[0] for i in ids]
    u = torch.from_numpy(np.random.default_rng([0, 17]).standard_normal(embedding.shape[1])).float()
    u /= u.norm()
    with torch.no_grad():
        size = SCALE * embedding.norm(dim=1).mean()
        for i in ids:
            embedding[i] += size * u
    out = HERE / "M1"
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    rows = texts(N_TEXTS)
    table = pd.DataFrame({"id": np.arange(N_TEXTS) // 2, "prompt": "Some words:", "text": rows})
    table.to_csv(HERE / "D0.csv", index=False)
    record = {"base": "resources/examples/given/M0", "triggers": TRIGGERS, "token_ids": ids, "scale": SCALE,
              "added_norm": float(size), "direction": [float(v) for v in u]}  # fmt: skip
    (HERE / "planted.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
