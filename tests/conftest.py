"""Shared test set-up."""

from unittest import mock

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread for the whole suite: the tests use small tensors, where two threads
    gain little on a quiet machine and lose badly (up to 100x) when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    """A randomly initialised torch-fidelity Inception saved as its real weights are (torch.save(state_dict)):
    the network runs offline with --inception-weights, without the real weights."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    state = net.state_dict()
    for key, value in state.items():  # keep activations O(1) through 90+ random layers (no denormals)
        if key.endswith("running_var"):
            value.fill_(0.15)
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(state, path)
    return path
