"""The public names."""

import stochmi


def test_every_public_name_resolves():
    for name in stochmi.__all__:
        assert getattr(stochmi, name) is not None, name


def test_unknown_attribute_raises():
    try:
        stochmi.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")
