"""kdjax.paper.provenance: parameter hashes and the environment record."""
import jax.numpy as jnp
import numpy as np

from kdjax.paper import provenance

AVX512_HOST = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f \
avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse
"""

AVX2_HOST = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 sse4a vaes
"""

ARM_HOST = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve sve2
CPU part\t: 0xd4f
"""


def test_cpu_record_reads_the_model_and_vector_extensions():
  rec = provenance.cpu_record(AVX512_HOST)
  assert rec["model"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
  # The first processor's flags, in VECTOR_EXTENSIONS' order; others ignored.
  assert rec["vector_extensions"] == [
      "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq",
      "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile",
      "amx_bf16", "amx_int8"]
  assert provenance.cpu_record(AVX2_HOST) == {
      "model": "AMD EPYC",
      "vector_extensions": ["sse4_2", "avx", "avx2", "fma", "f16c"]}
  assert provenance.cpu_record(ARM_HOST) == {
      "model": "0xd4f", "vector_extensions": ["asimd", "sve", "sve2"]}


def test_two_kinds_of_cpu_have_different_records():
  a = provenance.cpu_record(AVX512_HOST)["vector_extensions"]
  b = provenance.cpu_record(AVX2_HOST)["vector_extensions"]
  assert a != b


def test_environment_records_versions_device_and_this_cpu():
  env = provenance.environment()
  assert {"jax_version", "flax_version", "optax_version", "device",
          "python", "cpu"} <= set(env)
  assert env["cpu"] == {**provenance.cpu_record(),
                        "schedulable_cores": provenance.schedulable_cores()}
  assert env["cpu"]["schedulable_cores"] >= 1


def test_params_sha256_sees_one_bit():
  a = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  b = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3).at[1].set(2.0 ** -20)}
  assert provenance.params_sha256(a) == provenance.params_sha256(
      {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)})
  assert provenance.params_sha256(a) != provenance.params_sha256(b)
