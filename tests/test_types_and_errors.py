"""Generation parameters, the error table, and errors crossing Ray actors."""

from __future__ import annotations

import pickle

import pytest
from blip2_serve.deployments import errors
from blip2_serve.deployments.errors import Blip2ServeError, InvalidInput, status_of
from blip2_serve.deployments.types import GenerationParams

ERROR_TABLE = {
    errors.Blip2ServeError: (500, "INTERNAL"),
    errors.InvalidInput: (400, "INVALID_ARGUMENT"),
    errors.PayloadTooLarge: (413, "INVALID_ARGUMENT"),
    errors.NotFound: (404, "NOT_FOUND"),
    errors.ModelNotFound: (404, "NOT_FOUND"),
    errors.Unavailable: (503, "UNAVAILABLE"),
    errors.Unauthenticated: (401, "UNAUTHENTICATED"),
    errors.DeadlineExceeded: (504, "DEADLINE_EXCEEDED"),
    errors.Unimplemented: (400, "UNIMPLEMENTED"),
}


def _error_classes() -> set[type]:
    found, todo = set(), [Blip2ServeError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return {cls for cls in found if cls.__module__ == errors.__name__}


def test_every_error_class_has_one_http_status_and_grpc_code_and_pickles():
    assert _error_classes() == set(ERROR_TABLE), "a new error class needs its row here"
    for cls, (http_status, grpc_code) in ERROR_TABLE.items():
        exc = cls("because")
        assert status_of(exc) == (http_status, grpc_code, "because")
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is cls and copy.message == "because"


def test_unknown_errors_are_internal_and_hide_their_text():
    assert status_of(ValueError("secret detail")) == (500, "INTERNAL", "internal server error")


def test_errors_raised_in_a_ray_actor_keep_their_class(serve_ports):
    import ray

    @ray.remote
    def fails():
        raise InvalidInput("bad pixels")

    with pytest.raises(InvalidInput) as info:
        ray.get(fails.remote())
    assert status_of(info.value)[:2] == (400, "INVALID_ARGUMENT") and "bad pixels" in status_of(info.value)[2]


def test_generation_params_coercion():
    params = GenerationParams.from_mapping(
        {"max_new_tokens": 5.0, "do_sample": "true", "temperature": "0.5", "seed": 3, "top_k": 0}
    )
    assert params == GenerationParams(max_new_tokens=5, do_sample=True, temperature=0.5, seed=3, top_k=0)
    for bad in ({"seed": -1}, {"top_k": True}, {"temperature": float("nan")}, {"num_beams": [2]}):
        with pytest.raises(InvalidInput):
            GenerationParams.from_mapping(bad)


def test_batch_keys():
    greedy = GenerationParams(max_new_tokens=5)
    assert greedy.batch_key() == GenerationParams(max_new_tokens=30, temperature=0.3).batch_key()
    assert greedy.batch_key() != GenerationParams(max_new_tokens=5, num_beams=2).batch_key()
    beams = GenerationParams(max_new_tokens=5, num_beams=2)
    assert beams.batch_key() != GenerationParams(max_new_tokens=6, num_beams=2).batch_key()
    assert GenerationParams(do_sample=True, seed=1).runs_alone and not GenerationParams(do_sample=True).runs_alone
    assert "temperature" not in greedy.generate_kwargs(5)
    assert GenerationParams(do_sample=True, temperature=0.5).generate_kwargs(5)["temperature"] == 0.5


def test_lost_replicas_and_overload_are_retriable():
    """Ray's errors for a dead replica, an unreachable one, or a full queue map to 503 / UNAVAILABLE."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError

    for exc in (
        ActorDiedError(),
        ActorUnavailableError("gone", None),
        BackPressureError(num_queued_requests=1, max_queued_requests=1),
    ):
        status, code, message = status_of(exc)
        assert (status, code) == (503, "UNAVAILABLE"), exc
        assert "retry" in message or "overloaded" in message, message
