"""ONNX operators the TensorRT 10.3 ONNX parser imports (JetPack 6 / Jetson Orin ships TensorRT 10.3).

Source: onnx/onnx-tensorrt ``docs/operators.md`` of the release/10.3 branch ("TensorRT 10.3 supports operators in
the inclusive range of opset 9 to opset 20"). The search index available when this table was written held that
file only at releases 8.4 and 8.5, so the table is the 8.5 list of supported ("Y") operators plus the operators that
the 10.x parser is known to import and that 8.5 marked "N" (LayerNormalization, GroupNormalization, Gelu, the
window functions, IsInf, CastLike). Verify an op against the 10.3 file before relying on it if it is only here
because of that addition. Deliberately absent: ``Attention`` and ``RMSNormalization`` (opset 23; TensorRT parses
them only from 10.14/10.15), so an opset-23 graph fails the TensorRT check.
"""

from __future__ import annotations

TENSORRT_PARSER_VERSION = "10.3"
MAX_OPSET = 20

SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BlackmanWindow Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND
Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU
HammingWindow HannWindow HardSigmoid HardSwish Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max
MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


def unsupported_ops(op_types: set[str]) -> list[str]:
    """Operators of the default ONNX domain that the TensorRT 10.3 parser would reject, sorted."""
    return sorted(op for op in op_types if op not in SUPPORTED_OPS)
