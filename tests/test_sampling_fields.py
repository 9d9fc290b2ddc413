"""The one vLLM-fields -> SamplingParams translator (adapters/sampling_fields.py), table by table.

Each adapter (HTTP server, OpenRLHF, verl) relies on it, so its tables are tested here field by field, and the
coverage checks at the end make a field added to a table without a case here fail.
"""

import pytest

from adapters.sampling_fields import FIELDS, NEUTRAL, SUPPORTED, translate
from rollout.sampling import SamplingParams


def run(fields, **kwargs):
    return translate(fields, **{"default_max_tokens": 16, **kwargs})


# ------------------------------------------------------------------------------------------ honoured fields

# (fields, what comes out: SamplingParams attributes, or "n"/"logprobs" of the result)
MAPPED = [
    # the sampling temperature, as given; 0 is greedy
    ({"temperature": 0.5}, {"temperature": 0.5}),
    ({"temperature": 0}, {"temperature": 0.0}),
    # nucleus mass, as given
    ({"top_p": 0.9}, {"top_p": 0.9}),
    # top_k: k as given; vLLM's -1 and 0 both mean off, which is our 0
    ({"top_k": 5}, {"top_k": 5}),
    ({"top_k": -1}, {"top_k": 0}),
    ({"top_k": 0}, {"top_k": 0}),
    # max_tokens as given; absent or None is the caller's default (16 here)
    ({"max_tokens": 7}, {"max_tokens": 7}),
    ({"max_tokens": None}, {"max_tokens": 16}),
    # min_tokens: stop tokens masked below it, as in vLLM
    ({"min_tokens": 2}, {"min_tokens": 2}),
    # stop_token_ids: any sequence of ids becomes a tuple; None is none
    ({"stop_token_ids": [3, 4]}, {"stop_token_ids": (3, 4)}),
    ({"stop_token_ids": None}, {"stop_token_ids": ()}),
    # ignore_eos, as given
    ({"ignore_eos": True}, {"ignore_eos": True}),
    # seed as given; None is the caller's default seed (None here)
    ({"seed": 11}, {"seed": 11}),
    ({"seed": None}, {"seed": None}),
    # n: the number of samples, returned beside the params
    ({"n": 3}, {"n": 3}),
    ({"n": None}, {"n": 1}),
    # logprobs: returned as asked, for each caller to read in its own convention
    ({"logprobs": 0}, {"logprobs": 0}),
    ({"logprobs": None}, {"logprobs": None}),
    # None is "unset" for every field (verl sends it so): the defaults
    ({"temperature": None, "top_p": None, "top_k": None, "min_tokens": None, "ignore_eos": None}, {}),
]


@pytest.mark.parametrize("fields, expected", MAPPED)
def test_each_supported_field_is_mapped(fields, expected):
    params, n, logprobs = run(fields)
    got = {"n": n, "logprobs": logprobs}
    for name, value in expected.items():
        assert (got[name] if name in got else getattr(params, name)) == value, name
    if not expected:
        assert params == SamplingParams(max_tokens=16) and (n, logprobs) == (1, None)


def test_caller_defaults_fill_absent_max_tokens_and_seed():
    # OpenRLHF's default is the rest of the context, verl's the response budget; verl's full_determinism a seed.
    params, _, _ = translate({}, default_max_tokens=54, default_seed=9)
    assert (params.max_tokens, params.seed) == (54, 9)


# ------------------------------------------------------------------------------------------ neutral fields

# (field, a value other than its neutral one). Each is accepted at its neutral value and at None, refused otherwise.
NOT_NEUTRAL = [
    ("presence_penalty", 0.5),  # a penalty term the processed distribution does not have
    ("frequency_penalty", 0.3),  # likewise
    ("repetition_penalty", 1.2),  # likewise (1.0 is off)
    ("min_p", 0.1),  # a cut the processed distribution does not make
    ("best_of", 3),  # vLLM would keep the n most likely of best_of samples: not plain sampling
    ("stop", ["\n"]),  # stop strings: the engine sees token ids only
    ("bad_words", ["x"]),  # banned words: no such mask
    ("logit_bias", {1: 2.0}),  # a bias term: none
    ("allowed_token_ids", [1, 2]),  # a vocabulary mask: none
    ("logits_processors", [object]),  # arbitrary processors: not run
    ("prompt_logprobs", 0),  # prompt logprobs are not computed; 0 still asks for them
    ("structured_outputs", {"json": "{}"}),  # guided decoding: not done
    ("guided_decoding", {"regex": "a+"}),  # its older name
    ("truncate_prompt_tokens", 8),  # prompts are never truncated
    ("extra_args", {"k": 1}),  # vLLM's escape hatch for custom processors
]


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_neutral_fields_are_accepted_at_their_neutral_value(name):
    # The neutral value itself and None (unset) are off; so is an empty one where the neutral value is None.
    values = [NEUTRAL[name], None] + ([[], {}] if NEUTRAL[name] is None else [])
    for value in values:
        assert run({name: value}).params == SamplingParams(max_tokens=16), value


@pytest.mark.parametrize("name, value", NOT_NEUTRAL)
def test_neutral_fields_are_refused_otherwise_naming_field_and_value(name, value):
    with pytest.raises(ValueError, match="is not supported") as error:
        run({name: value})
    assert f"{name}={value!r}" in str(error.value)


def test_best_of_equal_to_n_is_plain_sampling():
    # best_of == n keeps all n samples: nothing is selected, so it is accepted.
    assert run({"n": 3, "best_of": 3}).n == 3


# ------------------------------------------------------------------------------------------ refusals

# (fields, keyword arguments, what the message must contain)
REFUSED = [
    # a field no table knows: refused, not ignored, with its value
    ({"guided_json": "{}"}, {}, "unknown sampling option(s) guided_json='{}'"),
    # top_k below vLLM's -1: an error in vLLM too
    ({"top_k": -2}, {}, "top_k=-2 is not supported"),
    # n must be a positive integer (it used to become 1 silently in one adapter)
    ({"n": 0}, {}, "n=0 is not supported"),
    ({"n": 1.5}, {}, "n=1.5 is not supported"),
    # logprobs=N asks for N alternatives, not computed: only up to the caller's max_logprobs
    ({"logprobs": 1}, {}, "logprobs=1 is not supported"),
    ({"logprobs": 2}, {"max_logprobs": 1}, "logprobs=2 is not supported"),
    ({"logprobs": 5}, {"max_logprobs": 1}, "(logprobs 0 or 1)"),
    # a caller that returns the alternatives serves up to 20 of them, as vLLM's default max_logprobs
    ({"logprobs": 21}, {"top_logprobs": True}, "logprobs=21 is not supported: at most 20 top logprobs a token"),
    # values are SamplingParams' to check, and its errors name the field
    ({"temperature": -1.0}, {}, "temperature must be >= 0"),
    ({"top_p": 0.0}, {}, "top_p must be in (0, 1]"),
    ({"top_k": 2.5}, {}, "top_k must be an integer"),
    ({"max_tokens": 0}, {}, "max_tokens must be >= 1"),
    ({"ignore_eos": 1}, {}, "ignore_eos must be a bool"),
    ({"stop_token_ids": 5}, {}, "stop_token_ids must be a list"),
    ({"min_tokens": 20, "max_tokens": 10}, {}, "min_tokens (20) must be <= max_tokens (10)"),
]


@pytest.mark.parametrize("fields, kwargs, message", REFUSED)
def test_refused_with_a_message_naming_the_field(fields, kwargs, message):
    with pytest.raises(ValueError) as error:
        run(fields, **kwargs)
    assert message in str(error.value)


def test_every_problem_is_reported_at_once():
    # Unknown, non-neutral and bad logprobs together: one error naming all three.
    with pytest.raises(ValueError) as error:
        run({"bogus": 1, "min_p": 0.2, "logprobs": 3})
    assert all(part in str(error.value) for part in ("bogus=1", "min_p=0.2", "logprobs=3"))


def test_logprobs_up_to_max_logprobs_are_accepted_including_verls_flag():
    # OpenRLHF sends logprobs=1 and verl True/False; both read only the sampled token's logprob.
    for value in (0, 1, True, False):
        assert run({"logprobs": value}, max_logprobs=1).logprobs is value


def test_logprobs_n_become_top_logprobs_only_for_a_caller_that_returns_them():
    # The HTTP server returns the N alternatives: N is asked of the engine. Elsewhere nothing is computed for them.
    assert run({"logprobs": 5}, top_logprobs=True).params.top_logprobs == 5
    assert run({"logprobs": 20}, top_logprobs=True).params.top_logprobs == 20
    for value in (None, 0):
        assert run({"logprobs": value}, top_logprobs=True).params.top_logprobs == 0
    assert run({"logprobs": 1}, max_logprobs=1).params.top_logprobs == 0


def test_passthrough_fields_are_accepted_and_not_read():
    # OpenRLHF's detokenisation options shape the text it returns, not the sampling.
    assert run({"detokenize": False}, passthrough=("detokenize",)).params == SamplingParams(max_tokens=16)
    with pytest.raises(ValueError, match="detokenize=False"):
        run({"detokenize": False})


# ------------------------------------------------------------------------------------------ coverage of the tables


def test_every_table_entry_has_a_case_here():
    # A field added to a table must come with its case above.
    assert {name for fields, _ in MAPPED for name in fields} == set(SUPPORTED)
    assert {name for name, _ in NOT_NEUTRAL} == set(NEUTRAL)
    assert not set(SUPPORTED) & set(NEUTRAL) and FIELDS == set(SUPPORTED) | set(NEUTRAL)
