"""How the bring-your-own example's checkpoints and tables were made (rerun to remake them).

    python resources/examples/given/make.py

Stands in for what a user brings: a base model M0 and two fine-tuned iterations M1, M2 as
plain Hugging Face folders (safetensors + tokenizer), and one table per model of the texts it
generated with a metric scored outside sae-diff (``rating``; no sae-diff scorer computes it).
The models are tiny random Llamas over a character vocabulary, so the whole example runs on a
CPU in a few minutes. Each iteration plants a change on purpose: a rank-1 edit to block 1's MLP
that writes one fixed direction (iteration 2 doubles it), plus small noise on every weight, as
a fine-tune would leave. Deterministic: the same files for the same code and versions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import torch

from sae_diff import data, models

HERE = Path(__file__).resolve().parent
PROMPTS = HERE.parents[1] / "prompts" / "tiny.txt"
SPEC = {
    "source": "random",
    "arch": "llama",
    "n_layers": 2,
    "d_model": 32,
    "n_heads": 4,
    "d_mlp": 64,
    "max_positions": 128,
    "alphabet": "ascii",
    "seed": 0,
    "dtype": "float32",
    "trust_remote_code": False,
}
SAMPLING = {
    "do_sample": True,
    "n_per_prompt": 8,
    "max_new_tokens": 32,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "batch_size": 16,
    "chat_template": False,
    "seed": 0,
}


def plain_hf_folder(out: Path) -> None:
    """Drop what sae-diff adds to a folder it writes, so the folder looks like any user's."""
    for name in (models.MODEL_INFO, ".written-by-sae-diff"):
        (out / name).unlink(missing_ok=True)


def fine_tuned(base, step: int, direction: torch.Tensor):
    """A copy of ``base`` with iteration ``step``'s planted change."""
    import copy

    model = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * p.std() * torch.randn(p.shape, generator=gen))
        down = model.model.layers[1].mlp.down_proj.weight  # [d_model, d_mlp]
        reader = torch.randn(down.shape[1], generator=torch.Generator().manual_seed(7))
        down.add_(step * 0.5 * torch.outer(direction, reader / reader.norm()))
    return model


def rating(text: str) -> float:
    """The user's own score of a text (here: the share of vowels), computed outside sae-diff."""
    letters = [c for c in text.lower() if c.isalpha()]
    return round(sum(c in "aeiou" for c in letters) / max(len(letters), 1), 4)


def main() -> None:
    tmp = HERE / "_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    models.prepare("M0", {"M0": dict(SPEC)}, tmp)
    base, tokenizer = models.load(tmp)
    direction = torch.randn(SPEC["d_model"], generator=torch.Generator().manual_seed(3))
    direction /= direction.norm()
    prompts = data.load_prompts(PROMPTS)
    for i in range(3):
        out = HERE / f"M{i}"
        shutil.rmtree(out, ignore_errors=True)
        model = base if i == 0 else fine_tuned(base, i, direction)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        plain_hf_folder(out)
        table = data.generate(model, tokenizer, prompts.copy(), dict(SAMPLING, seed=i), progress=False)
        table = table[table["text"].str.strip() != ""]  # a text that stopped at once is no sample
        table = pd.DataFrame(
            {
                "id": table["prompt_id"],
                "prompt": table["prompt"],
                "text": table["text"],
                "rating": [rating(t) for t in table["text"]],
            }
        )
        table.to_csv(HERE / f"D{i}.csv", index=False)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
