"""The ids ``prepare criteo`` (and hashed tabular fields) give string values are pinned: a trained
model's tables and a serving process that hashes raw requests depend on them staying the same."""

import numpy as np
import pyarrow as pa

from recsys_llm.data.hashing import fnv1a_64, hash_strings


def _reference_fnv1a_64(text: str, salt: int) -> int:
    """64-bit FNV-1a over the UTF-8 bytes, after one round on the salt (as documented)."""
    state = ((0xCBF29CE484222325 ^ salt) * 0x100000001B3) % 2**64
    for byte in text.encode("utf-8"):
        state = ((state ^ byte) * 0x100000001B3) % 2**64
    return state


def test_fnv1a_matches_the_reference_and_known_values():
    values = ["68fd1e64", "80e26c9b", "a", "é", "0" * 40]
    for salt in (0, 3, 25):
        got = fnv1a_64(pa.array(values), salt=salt)
        assert [int(h) for h in got] == [_reference_fnv1a_64(v, salt) for v in values]
    assert int(fnv1a_64(pa.array(["68fd1e64"]), salt=0)[0]) == 4617833014795587123
    assert int(fnv1a_64(pa.array(["68fd1e64"]), salt=3)[0]) == 5744404957562095402


def test_criteo_ids_are_stable():
    """C1's token ``68fd1e64`` is id 219757 of a 1M-row table, C26's 795293; empty or missing is 0."""
    ids = hash_strings(pa.array(["68fd1e64", None, "", "80e26c9b"]), 1_000_000, salt=0)
    np.testing.assert_array_equal(ids, [219757, 0, 0, 999628])
    assert hash_strings(pa.array(["68fd1e64"]), 1_000_000, salt=25)[0] == 795293
    assert hash_strings(pa.array(["68fd1e64"]), 1_000_000)[0] == _reference_fnv1a_64("68fd1e64", 0) % 999_999 + 1


def test_hash_strings_refuses_a_bool_salt_and_takes_a_numpy_one():
    import numpy as np
    import pyarrow as pa
    import pytest
    from recsys_llm.data.hashing import hash_strings

    with pytest.raises(ValueError, match=r"hash_strings: salt must be an integer, got True"):
        hash_strings(pa.array(["a"]), 10, salt=True)
    with_numpy_salt = hash_strings(pa.array(["a"]), 10, salt=np.int64(1))
    assert with_numpy_salt.tolist() == hash_strings(pa.array(["a"]), 10, salt=1).tolist()
