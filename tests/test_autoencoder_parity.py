"""The autoencoder against diffusers' ``AutoencoderKL`` itself, on the same random weights: a seeded
PyTorch model's state dict saved as safetensors, converted (also under the older attention names and
as 1x1 convolutions), loaded, and compared on the same images and latents (float32, highest matmul
precision). Skips without torch and diffusers (the lowest CI leg installs them)."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # imports PyTorch and diffusers (~10 s) and compiles the autoencoder; CI's lowest leg runs it

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from workshop_dist.data.cli import main as workshop_data  # noqa: E402
from workshop_dist.models.autoencoder_weights import convert_sd_vae, load_autoencoder  # noqa: E402
from workshop_dist.weights import WeightsError, read_safetensors  # noqa: E402

TOLERANCE = 1e-4  # max |ours - theirs| / max |theirs|
BLOCKS = (32, 64)
SIZE = 16


@pytest.fixture(scope="module")
def original():
    """A small ``AutoencoderKL`` (factor 2, 32 groups, 4 latent channels) with random weights, norms and biases."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(BLOCKS), block_out_channels=BLOCKS, layers_per_block=1,
        norm_num_groups=32, latent_channels=4,
    ).eval()
    with torch.no_grad():
        for param in vae.parameters():
            if param.ndim == 1:  # GroupNorm scales start at 1, biases at 0: move them so a swap would show
                param.add_(0.2 * torch.randn_like(param))
    return vae


@pytest.fixture(scope="module")
def state(original):
    return {name: tensor.detach().contiguous() for name, tensor in original.state_dict().items()}


def relative(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def test_encoder_moments_and_decoder_match_diffusers(original, state, tmp_path):
    save_file(state, tmp_path / "vae.safetensors")
    convert_sd_vae(tmp_path / "vae.safetensors", tmp_path / "nnx.safetensors")
    model = load_autoencoder(tmp_path / "nnx.safetensors", (SIZE, SIZE, 3))
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32)  # data space [0, 1]; diffusers takes [-1, 1]
    with torch.no_grad():
        posterior = original.encode(torch.from_numpy(2 * images - 1).permute(0, 3, 1, 2)).latent_dist
        mean, logvar = (t.permute(0, 2, 3, 1).numpy() for t in (posterior.mean, posterior.logvar))
        latents = rng.standard_normal(mean.shape).astype(np.float32)
        decoded = original.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    with jax.default_matmul_precision("highest"):
        our_mean, our_logvar = jax.jit(model.encode)(jnp.asarray(images))
        ours = jax.jit(model.decode)(jnp.asarray(latents))
    errors = {"mean": relative(our_mean, mean), "logvar": relative(our_logvar, logvar),
              "decoded": relative(2 * np.asarray(ours) - 1, decoded)}  # decode gives data space
    print("max relative errors:", errors)
    assert max(errors.values()) < TOLERANCE, errors
    assert model.scaling_factor == original.config.scaling_factor == 0.18215


def test_older_attention_names_and_1x1_convolutions_convert_the_same(state, tmp_path):
    save_file(state, tmp_path / "vae.safetensors")
    expected, _ = read_safetensors(convert_sd_vae(tmp_path / "vae.safetensors", tmp_path / "new.safetensors"))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for as_conv in (False, True):
        renamed = {}
        for name, tensor in state.items():
            for new, older in old.items():
                if ".attentions.0." in name and f".{new}." in name:
                    name = name.replace(f".{new}.", f".{older}.")
                    tensor = tensor[:, :, None, None].contiguous() if as_conv and tensor.ndim == 2 else tensor
            renamed[name] = tensor
        assert "encoder.mid_block.attentions.0.proj_attn.weight" in renamed
        save_file(renamed, tmp_path / "old.safetensors")
        converted, _ = read_safetensors(convert_sd_vae(tmp_path / "old.safetensors", tmp_path / "old-nnx.safetensors"))
        assert converted.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(converted[name], value, err_msg=name)


def test_a_missing_and_an_extra_tensor_are_one_error_naming_both(state, tmp_path):
    broken = dict(state)
    del broken["encoder.mid_block.attentions.0.to_k.bias"]
    broken["decoder.mid_block.attentions.0.to_extra.weight"] = torch.zeros(64, 64)
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(WeightsError) as caught:
        convert_sd_vae(tmp_path / "broken.safetensors", tmp_path / "out.safetensors")
    message = str(caught.value)
    assert "1 unmatched, 1 missing tensor(s)" in message
    assert "decoder.mid_block.attentions.0.to_extra.weight" in message  # the extra one, by its PyTorch name
    assert "encoder.mid_block.attentions.0.to_k.bias" in message  # the missing one
    assert not (tmp_path / "out.safetensors").exists()


def test_workshop_data_convert_weights_sd_vae(state, tmp_path, capsys):
    save_file(state, tmp_path / "vae.safetensors")
    code = workshop_data(["convert-weights", "sd-vae", str(tmp_path / "vae.safetensors"), str(tmp_path / "out.safetensors")])
    assert code == 0, capsys.readouterr()
    assert load_autoencoder(tmp_path / "out.safetensors", (SIZE, SIZE, 3)).latent_shape == (SIZE // 2, SIZE // 2, 4)
    save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    code = workshop_data(["convert-weights", "sd-vae", str(tmp_path / "other.safetensors"), str(tmp_path / "x.safetensors")])
    assert code == 2 and "not a diffusers AutoencoderKL state dict" in capsys.readouterr().err
