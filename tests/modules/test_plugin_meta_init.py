"""FRE and FIE built the way TorchRec models are (under ``torch.device("meta")``, materialised later) and loaded
the way DMP and ``torch.distributed.checkpoint`` load (no ``load_state_dict`` hook runs)."""

import pytest
import torch

from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
from recsys_llm.modules.field_semantics import FieldRepresentationEnhancement
from tests.modules.llactr_helpers import FEATURES, make_ebc, make_kjt

VECTORS = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))


def _terms():
    return (FieldInteractionEnhancement(VECTORS, FEATURES, weight=0.1),
            FieldRepresentationEnhancement(VECTORS, FEATURES, embedding_dim=8, weight=0.1))


def _outputs(fie, fre, pooled):
    return fie.logit(pooled), fre.loss(pooled)


def test_terms_built_under_the_meta_device_keep_their_constants():
    """DMP zero-fills a buffer on meta: FIE's pair indices were all (0, 0) and its similarities made up."""
    torch.manual_seed(1)
    reference = _terms()
    with torch.device("meta"):
        built = _terms()
    for term, expected in zip(built, reference):
        for name, buffer in term.named_buffers():
            assert buffer.device.type == "cpu", name
            torch.testing.assert_close(buffer, dict(expected.named_buffers())[name], msg=name)
        assert all(param.is_meta for param in term.parameters())
        term.to_empty(device="cpu")  # what DMP does to a module's meta parameters, here to all of it
        for module in term.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()  # the meta-init convention (DMP calls it on meta-parameter modules)
        term.load_state_dict(expected.state_dict())
    pooled = make_ebc()(make_kjt())
    for got, want in zip(_outputs(*built, pooled), _outputs(*reference, pooled)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("term", ["FIE", "FRE"])
def test_meta_field_vectors_are_refused(term):
    with pytest.raises(ValueError, match=rf"^{term}: field_vectors are on the meta device"):
        with torch.device("meta"):
            vectors = torch.randn(3, 7)
            if term == "FIE":
                FieldInteractionEnhancement(vectors, FEATURES)
            else:
                FieldRepresentationEnhancement(vectors, FEATURES, embedding_dim=8)


def test_reset_parameters_after_to_empty_writes_the_constants_back():
    fie, fre = _terms()
    before = {name: buffer.clone() for term in (fie, fre) for name, buffer in term.named_buffers()}
    for term in (fie, fre):
        term.to_empty(device="cpu")
        for buffer in term.buffers():
            buffer.fill_(7)
        term.reset_parameters()
    after = {name: buffer for term in (fie, fre) for name, buffer in term.named_buffers()}
    for name, buffer in before.items():
        torch.testing.assert_close(after[name], buffer, msg=name)


def test_reset_parameters_unfreezes_the_fie():
    """Its frozen weights are reset to zeros: a term left frozen would add nothing to the logits."""
    fie, _ = _terms()
    fie.freeze()
    fie.to_empty(device="cpu")
    fie.reset_parameters()
    assert not fie.frozen and fie.serving_key_order is None


def _frozen_fie_loaded_by_dmp(trained_state, pooled_values, keys):
    """A frozen FIE in a model that DistributedModelParallel wraps, loaded with DMP.load_state_dict (which calls
    each module's _load_from_state_dict, parent before child, and runs no load_state_dict hook)."""
    from torch import nn
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.sparse.jagged_tensor import KeyedTensor

    from recsys_llm.train.distributed import init_distributed

    init_distributed("cpu")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fie, _ = _terms()

    model = Model()
    model.fie.freeze()
    dmp = DistributedModelParallel(model, device=torch.device("cpu"))
    dmp.load_state_dict({f"fie.{name}": value for name, value in trained_state.items()})
    pooled = KeyedTensor.from_tensor_list(keys, list(pooled_values))
    return model.fie.logit(pooled).detach()


@pytest.mark.multiprocess
def test_a_frozen_fie_takes_the_weights_dmp_loads():
    """DMP.load_state_dict ran no hook: a frozen term kept the weights it had (zeros when the checkpoint came from a
    run that never froze), and FIE added nothing to the logits."""
    from tests.multiprocess import run_multiprocess

    torch.manual_seed(2)
    pooled = make_ebc()(make_kjt())
    trained, _ = _terms()
    expected = trained.logit(pooled).detach()
    values = [pooled[key].detach() for key in pooled.keys()]
    (served,) = run_multiprocess(_frozen_fie_loaded_by_dmp, world_size=1, trained_state=trained.state_dict(),
                                 pooled_values=values, keys=pooled.keys())
    torch.testing.assert_close(served, expected)


def test_a_frozen_fie_after_an_in_place_load_is_refreshed_by_refresh_after_load():
    """An in-place torch.distributed.checkpoint.load runs no module code: refresh_after_load brings the frozen
    weights to the loaded Linear."""
    from recsys_llm.modules.field_interaction import refresh_after_load

    torch.manual_seed(2)
    pooled = make_ebc()(make_kjt())
    trained, _ = _terms()
    expected = trained.logit(pooled).detach()
    served, _ = _terms()
    served.freeze()
    with torch.no_grad():
        for name, tensor in served.state_dict().items():  # in place, as torch.distributed.checkpoint.load
            tensor.copy_(trained.state_dict()[name])
    refresh_after_load(served)
    torch.testing.assert_close(served.logit(pooled), expected)
    # or the model holding it (a DistributedModelParallel, a task): each of its FIE terms
    held, _ = _terms()
    held.freeze()
    model = torch.nn.ModuleDict({"task": torch.nn.ModuleDict({"fie": held})})
    with torch.no_grad():
        for name, tensor in held.state_dict().items():
            tensor.copy_(trained.state_dict()[name])
    refresh_after_load(model)
    torch.testing.assert_close(held.logit(pooled), expected)


def test_a_frozen_runs_copy_is_kept_when_loaded_though_its_linear_moved():
    """Adam with weight decay moves a frozen term's Linear on zero gradients (the frozen copy, not the Linear, is
    what it trained with): loading its state rebuilt the copy from the moved Linear."""
    from recsys_llm.modules.field_interaction import refresh_after_load

    torch.manual_seed(3)
    pooled = make_ebc()(make_kjt())
    trained, _ = _terms()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=0.1, weight_decay=0.1)
    for frozen in (False, True, True, True):  # a step before freezing leaves gradients, zeroed, not None
        if frozen and not trained.frozen:
            trained.freeze()
        optimizer.zero_grad(set_to_none=False)
        trained.logit(pooled).sum().backward(retain_graph=True)
        optimizer.step()
    expected = trained.logit(pooled).detach()
    state = trained.state_dict()
    assert not torch.allclose(trained.pair_weight(trained.pair_similarity), trained.frozen_pair_weights)  # moved
    for load in ("load_state_dict", "as DMP", "in place"):
        served, _ = _terms()
        served.freeze()
        if load == "load_state_dict":
            served.load_state_dict(state)
        elif load == "as DMP":  # each module's _load_from_state_dict, the parent first, and no hook
            served._load_from_state_dict(state, "", {}, True, [], [], [])
            served.pair_weight._load_from_state_dict(state, "pair_weight.", {}, True, [], [], [])
        else:
            with torch.no_grad():
                for name, tensor in served.state_dict().items():
                    tensor.copy_(state[name])
            refresh_after_load(served)
        torch.testing.assert_close(served.logit(pooled), expected, msg=load)
