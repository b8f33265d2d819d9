"""mtht under the oldest versions its requirements allow (pyproject.toml): numpy 1.23 and the
monolith extra's protobuf 4.21. Those are installed into a directory of their own, put
first on the path of a pytest run of the test files of tables, inputs, configs and
checkpoints. (The frameworks, torch and JAX, and ml_dtypes are built against numpy 2:
that run goes without them, as their tests allow.)"""

import os
import pathlib
import subprocess
import sys

import pytest

OLDEST = ["numpy==1.23.5", "protobuf==4.21.12"]
TEST_FILES = ["test_hash_table.py", "test_batch_paths.py", "test_multi_type_hash_table.py", "test_entry.py",
              "test_learning_rate_functions.py", "test_monolith_checkpoint.py", "test_serving.py"]
HERE = pathlib.Path(__file__).resolve().parent

_RUN = """
import sys
for name in ("torch", "jax", "ml_dtypes"):
    sys.modules[name] = None  # built against numpy 2: their tests skip
import google.protobuf, numpy, pytest
print("versions", numpy.__version__, google.protobuf.__version__, flush=True)
# A ragged list is refused before numpy would warn of it (and make an object array of it).
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-W", "error::numpy.VisibleDeprecationWarning", *sys.argv[1:]]))
"""


@pytest.fixture(scope="module")
def oldest(tmp_path_factory):
    target = tmp_path_factory.mktemp("oldest")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:",
                              "--target", str(target), *OLDEST], capture_output=True, text=True, timeout=600)
    if install.returncode != 0:
        pytest.skip(f"cannot install {OLDEST} here: {install.stderr.strip()[-300:]}")
    return target


def test_the_tests_pass_under_the_oldest_numpy_and_protobuf_allowed(oldest):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(oldest), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", _RUN, *TEST_FILES], cwd=HERE, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert "versions 1.23.5 4.21.12" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
