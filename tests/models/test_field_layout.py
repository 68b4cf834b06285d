import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys_llm.models.base import fields_in_key_order, stack_fields


def _keyed(keys, dims, batch_size: int = 3) -> KeyedTensor:
    torch.manual_seed(0)
    return KeyedTensor(keys=keys, length_per_key=dims, values=torch.randn(batch_size, sum(dims)))


class TestFieldsInKeyOrder:
    def test_equal_dims_give_a_view_and_positions(self) -> None:
        kt = _keyed(["a", "b", "c"], [4, 4, 4])
        fields, positions = fields_in_key_order(kt, ["c", "a"])
        assert fields.shape == (3, 3, 4) and fields.data_ptr() == kt.values().data_ptr()
        assert positions.tolist() == [2, 0]
        torch.testing.assert_close(fields[:, positions], stack_fields(kt, ["c", "a"]))

    def test_unequal_dims_stack_the_named_fields(self) -> None:
        kt = _keyed(["a", "b", "c"], [4, 2, 4])
        fields, positions = fields_in_key_order(kt, ["c", "a"])
        torch.testing.assert_close(fields, stack_fields(kt, ["c", "a"]))
        assert positions.tolist() == [0, 1]

    def test_stacking_fields_of_different_widths_names_each_width(self) -> None:
        """Fields whose embedding widths differ (a schema field's own embedding_dim) cannot be stacked: the error
        names every field's width, not torch.stack's "stack expects each tensor to be equal size"."""
        kt = _keyed(["a", "b", "c"], [4, 2, 4])
        with pytest.raises(ValueError, match=r"^fields \['c', 'b', 'a'\] must share one embedding dim to be stacked, "
                                             r"got \{'c': 4, 'b': 2, 'a': 4\}$"):
            stack_fields(kt, ["c", "b", "a"])
        assert stack_fields(kt, ["c", "a"]).shape == (3, 2, 4)  # the fields named are the ones that must agree

    def test_missing_key_names_it(self) -> None:
        with pytest.raises(KeyError, match=r"no keys \['z'\]; their keys are \['a', 'b'\]"):
            fields_in_key_order(_keyed(["a", "b"], [4, 4]), ["a", "z"])

    @pytest.mark.parametrize("dims", [[4, 4, 4], [4, 2, 4]])
    def test_a_repeated_key_of_a_named_field_names_it(self, dims) -> None:
        """Two EBCs' outputs joined by KeyedTensor.from_tensor_list may both hold a key: a field read by name would
        silently be the last of them (to_dict keeps it); it is refused, naming the key, in either layout."""
        kt = _keyed(["a", "b", "a"], dims)
        with pytest.raises(ValueError, match=r"hold keys \['a'\] more than once \(their keys are \['a', 'b', 'a'\]\)"):
            fields_in_key_order(kt, ["b", "a"])
        fields, positions = fields_in_key_order(kt, ["b"])  # a key repeated but not read is no ambiguity
        torch.testing.assert_close(fields[:, positions] if dims[0] == dims[1] else fields, stack_fields(kt, ["b"]))

    def test_positions_made_while_exporting_are_not_reused(self) -> None:
        class Picker(torch.nn.Module):
            def forward(self, values: torch.Tensor) -> torch.Tensor:
                kt = KeyedTensor(keys=["p", "q"], length_per_key=[2, 2], values=values)
                fields, positions = fields_in_key_order(kt, ["q"])
                return fields[:, positions].sum(dim=(1, 2))

        values = torch.randn(3, 4)
        torch.export.export(Picker(), (values,), strict=False)
        torch.testing.assert_close(Picker()(values), values[:, 2:].sum(dim=1))
