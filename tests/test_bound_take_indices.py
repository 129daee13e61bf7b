"""BoundTakeIndices: run-time gather indices are clamped (mode clip), constant ones kept."""

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from bluelower.passes.bound_take_indices import BoundTakeIndices
from bluelower.passes.ir_utils import without_results


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((4, 3), "float32"), i: R.Tensor((1,), "int64")):
        with R.dataflow():
            a = R.take(x, i, axis=0, mode="fast")
            b = R.take(x, R.const(2, "int64"), axis=0, mode="fast")
            out = (a, b)
            R.output(out)
        return out


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((4, 3), "float32"), i: R.Tensor((1,), "int64")):
        with R.dataflow():
            a = R.take(x, i, axis=0, mode="clip")
            b = R.take(x, R.const(2, "int64"), axis=0, mode="fast")
            out = (a, b)
            R.output(out)
        return out


def test_golden():
    tvm.ir.assert_structural_equal(without_results(BoundTakeIndices()(Before)), Expected)


def test_out_of_range_index_reads_the_edge_row_not_memory_outside():
    mod = BoundTakeIndices()(Before)
    ex = relax.build(mod, tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    for idx, row in ((1, 1), (9, 3), (-5, 0)):
        a, b = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.array([idx], np.int64)))
        assert np.array_equal(a.numpy(), x[[row]]) and np.array_equal(b.numpy(), x[2])
