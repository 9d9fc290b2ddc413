"""vLLM's sampling fields -> our SamplingParams: the one translation every adapter uses.

The HTTP server (TRL's client), OpenRLHF and verl all hand us vLLM's sampling fields: in a pydantic body, a vLLM
SamplingParams object, a dict. Each adapter used to translate them with its own table of what is honoured and what
is refused, and the tables drifted apart (one took top_k=-5 and n=0 silently, one refused min_tokens, ...). Here a
field is honoured, accepted only at its neutral value, or refused the same way whichever trainer sends it, and a
refusal is a ValueError naming the field and its value: a run never samples silently from a distribution other
than the one it asked for.

vLLM's conventions, handled here once: None means "unset"; top_k -1 and 0 both mean off; logprobs=N asks for the
sampled token's logprob and the N most likely alternatives. A caller that returns the alternatives (the HTTP server)
says so (top_logprobs=True) and N becomes SamplingParams.top_logprobs; for the others only the sampled token's
logprob is computed. What each adapter keeps is how the fields arrive and what its caller means by them: the default
max_tokens and seed, how large a logprobs it may ask for and still be served, how many samples (n) one call may ask
for.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Mapping, Sized
from typing import Any, NamedTuple

from rollout.sampling import MAX_TOP_LOGPROBS, SamplingParams

# Honoured, and what an absent or None value stands for. max_tokens and seed default to the caller's (vLLM's HTTP
# API says 16 tokens, OpenRLHF the rest of the context, verl the response budget).
SUPPORTED: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "max_tokens": None,
    "min_tokens": 0,
    "stop_token_ids": (),
    "ignore_eos": False,
    "seed": None,
    "n": 1,
    "logprobs": None,
}

# Not honoured, because the processed distribution (rollout/sampling.py) has no such term or the engine sees no
# text: accepted only at the value that means "off", or None. Where that value is None, an empty one ([] stops,
# {} bias) is off too, as in vLLM; 0 is not (prompt_logprobs=0 still asks for prompt logprobs).
NEUTRAL: dict[str, Any] = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_p": 0.0,
    "best_of": None,  # also off when equal to n: vLLM samples best_of and keeps the n most likely
    "stop": None,  # stop strings
    "bad_words": None,
    "logit_bias": None,
    "allowed_token_ids": None,
    "logits_processors": None,
    "prompt_logprobs": None,
    "structured_outputs": None,
    "guided_decoding": None,
    "truncate_prompt_tokens": None,
    "extra_args": None,
}

FIELDS = frozenset(SUPPORTED) | frozenset(NEUTRAL)


class Translated(NamedTuple):
    params: SamplingParams
    n: int  # samples of the prompt
    logprobs: Any  # as asked (None, a count, verl's flag): each caller reads it in its own convention


def _is_neutral(value: Any, neutral: Any) -> bool:
    if value is None or value == neutral:
        return True
    return neutral is None and isinstance(value, Sized) and len(value) == 0


def translate(
    fields: Mapping[str, Any],
    *,
    default_max_tokens: int,
    default_seed: int | None = None,
    max_logprobs: int = 0,
    top_logprobs: bool = False,
    passthrough: Collection[str] = (),
) -> Translated:
    """vLLM-style sampling fields -> (SamplingParams, n, logprobs). A ValueError names every field refused.

    max_logprobs: the largest logprobs=N the caller may ask for and be served with the sampled token's logprob
    only, because it reads nothing else. top_logprobs: the caller returns the N alternatives too; logprobs=N, up to
    MAX_TOP_LOGPROBS, becomes the params' top_logprobs (max_logprobs is then moot). passthrough: fields the caller
    reads itself (text detokenisation, say), accepted and not read here.
    """
    defaults = {**SUPPORTED, "max_tokens": default_max_tokens, "seed": default_seed}

    def get(name: str) -> Any:
        value = fields.get(name)
        return defaults[name] if value is None else value

    # Every problem at once, so a request with several is fixed in one round trip.
    problems = []
    unknown = sorted(set(fields) - FIELDS - set(passthrough))
    if unknown:
        known = ", ".join(sorted(FIELDS | set(passthrough)))
        given = ", ".join(f"{name}={fields[name]!r}" for name in unknown)
        problems.append(f"unknown sampling option(s) {given} (known: {known})")
    n = get("n")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        problems.append(f"n={n!r} is not supported: it must be an integer >= 1")
    for name, neutral in NEUTRAL.items():
        value = fields.get(name)
        if name == "best_of" and value == n:
            continue
        if not _is_neutral(value, neutral):
            only = "None or n" if name == "best_of" else repr(neutral)
            problems.append(f"{name}={value!r} is not supported by specrollout (only {only})")
    logprobs = fields.get("logprobs")
    # range() membership takes bools and integral floats as the integers they equal, as the old checks did.
    if top_logprobs:
        if logprobs is not None and logprobs not in range(MAX_TOP_LOGPROBS + 1):
            problems.append(f"logprobs={logprobs!r} is not supported: at most {MAX_TOP_LOGPROBS} top logprobs a token")
    elif logprobs is not None and logprobs not in range(max_logprobs + 1):
        allowed = " or ".join(map(str, range(max_logprobs + 1)))
        problems.append(
            f"logprobs={logprobs!r} is not supported: only the sampled token's logprob is returned (logprobs {allowed})"
        )
    top_k = get("top_k")
    if top_k == -1:  # vLLM's "off", as is 0
        top_k = 0
    elif isinstance(top_k, numbers.Real) and not isinstance(top_k, bool) and top_k < -1:
        # Caught here because SamplingParams' own message ("must be >= 0") would call vLLM's -1 wrong.
        problems.append(f"top_k={top_k!r} is not supported: -1 or 0 turn it off, else it must be >= 1")
    if problems:
        raise ValueError("; ".join(problems))
    # The values' types and ranges are SamplingParams' to check: its errors name the field too.
    params = SamplingParams(
        temperature=get("temperature"),
        top_p=get("top_p"),
        top_k=top_k,
        max_tokens=get("max_tokens"),
        min_tokens=get("min_tokens"),
        stop_token_ids=get("stop_token_ids"),
        ignore_eos=get("ignore_eos"),
        seed=get("seed"),
        top_logprobs=int(logprobs or 0) if top_logprobs else 0,
    )
    return Translated(params, int(n), logprobs)
