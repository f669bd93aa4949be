"""The ONNX operators the TensorRT parser imports, with the types and restrictions it documents.

Generated from onnx/onnx-tensorrt ``docs/operators.md`` at tag 10.1-GA (Apache-2.0): the closest published parser
table to TensorRT 10.3, which JetPack 6 ships on Jetson Orin ("opset 9 to opset 20"). An operator is importable
only if listed in ``SUPPORTED``; ``UNSUPPORTED`` are the ones the table marks "N" (among them the window functions
and, being newer than opset 20, ``Attention``/``RMSNormalization`` are absent altogether). The restrictions are
quoted from the table; :mod:`sparse_context.export.checks` tests the ones that can apply to our graphs.
"""

from __future__ import annotations

TENSORRT_PARSER_VERSION = "10.3"
TABLE_SOURCE = "onnx/onnx-tensorrt docs/operators.md, tag 10.1-GA"
MAX_OPSET = 20

# operator: (supported types, restriction or "")
SUPPORTED: dict[str, tuple[tuple[str, ...], str]] = {
    "Abs": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Acos": (('FP32', 'FP16', 'BF16'), ''),
    "Acosh": (('FP32', 'FP16', 'BF16'), ''),
    "Add": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "And": (('BOOL',), ''),
    "ArgMax": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "ArgMin": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Asin": (('FP32', 'FP16', 'BF16'), ''),
    "Asinh": (('FP32', 'FP16', 'BF16'), ''),
    "Atan": (('FP32', 'FP16', 'BF16'), ''),
    "Atanh": (('FP32', 'FP16', 'BF16'), ''),
    "AveragePool": (('FP32', 'FP16', 'BF16'), '2D or 3D Pooling only. dilations must be empty or all ones'),
    "BatchNormalization": (('FP32', 'FP16', 'BF16'), ''),
    "Cast": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'UINT8', 'BOOL'), ''),
    "CastLike": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'UINT8', 'BOOL'), ''),
    "Ceil": (('FP32', 'FP16', 'BF16'), ''),
    "Celu": (('FP32', 'FP16', 'BF16'), ''),
    "Clip": (('FP32', 'FP16', 'BF16'), ''),
    "Concat": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "Constant": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'),
             'sparse_value, value_string, and value_strings attributes are unsupported.'),
    "ConstantOfShape": (('FP32', 'FP16', 'BF16', 'INT32', 'INF64', 'BOOL'), ''),
    "Conv": (('FP32', 'FP16', 'BF16'), ''),
    "ConvTranspose": (('FP32', 'FP16', 'BF16'), ''),
    "Cos": (('FP32', 'FP16', 'BF16'), ''),
    "Cosh": (('FP32', 'FP16', 'BF16'), ''),
    "CumSum": (('FP32', 'FP16', 'BF16'), 'axis must be an initializer'),
    "DeformConv": (('FP32', 'FP16'),
             'input must have 1D or 2D spatial dimensions. pads for the beginning and end along each spatial '
             'axis must be the same'),
    "DepthToSpace": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "DequantizeLinear": (('INT8', 'FP8', 'INT4'), 'x_zero_point must be zero'),
    "Div": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Dropout": (('FP32', 'FP16', 'BF16'), 'is_traning must be an initializer and evaluate to False.'),
    "Einsum": (('FP32', 'FP16', 'BF16'), ''),
    "Elu": (('FP32', 'FP16', 'BF16'), ''),
    "Equal": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Erf": (('FP32', 'FP16', 'BF16'), ''),
    "Exp": (('FP32', 'FP16', 'BF16'), ''),
    "Expand": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "EyeLike": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), 'input must have static dimensions'),
    "Flatten": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "Floor": (('FP32', 'FP16', 'BF16'), ''),
    "Gather": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "GatherElements": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "GatherND": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "Gelu": (('FP32', 'FP16', 'BF16', 'INT8', 'INT32', 'INT64'), ''),
    "Gemm": (('FP32', 'FP16', 'BF16'), ''),
    "GlobalAveragePool": (('FP32', 'FP16', 'BF16'), ''),
    "GlobalLpPool": (('FP32', 'FP16', 'BF16'), ''),
    "GlobalMaxPool": (('FP32', 'FP16', 'BF16'), ''),
    "Greater": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "GreaterOrEqual": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "GridSample": (('FP32', 'FP16'), 'Input must be 4D input.'),
    "GroupNormalization": (('FP32', 'FP16', 'BF16'), ''),
    "GRU": (('FP32', 'FP16', 'BF16'),
             'For bidirectional GRUs, activation functions must be the same for both the forward and reverse '
             'pass'),
    "HardSigmoid": (('FP32', 'FP16', 'BF16'), ''),
    "HardSwish": (('FP32', 'FP16', 'BF16'), ''),
    "Hardmax": (('FP32', 'FP16', 'BF16'), 'axis dimension of input must be a build-time constant'),
    "Identity": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "If": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'),
             'Output tensors of the two conditional branches must have the same rank and must have different '
             'names'),
    "ImageScaler": (('FP32', 'FP16', 'BF16'), ''),
    "InstanceNormalization": (('FP32', 'FP16', 'BF16'), ''),
    "IsInf": (('FP32', 'FP16', 'BF16'), ''),
    "IsNaN": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "LayerNormalization": (('FP32', 'FP16', 'BF16'), 'Only the first output Y is supported.'),
    "LeakyRelu": (('FP32', 'FP16', 'BF16'), ''),
    "Less": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "LessOrEqual": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Log": (('FP32', 'FP16', 'BF16'), ''),
    "LogSoftmax": (('FP32', 'FP16', 'BF16'), ''),
    "Loop": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'),
             'Scan output length cannot be dynamic. The shape of Loop carried dependencies must be the same '
             'across all loop iterations.'),
    "LRN": (('FP32', 'FP16', 'BF16'), ''),
    "LSTM": (('FP32', 'FP16', 'BF16'),
             'For bidirectional LSTMs, activation functions must be the same for both the forward and reverse '
             'pass. input_forget attribute must be 0. layout attribute must be 0.'),
    "LpNormalization": (('FP32', 'FP16', 'BF16'), ''),
    "LpPool": (('FP32', 'FP16', 'BF16'), 'dilations must be empty or all ones'),
    "MatMul": (('FP32', 'FP16', 'BF16'), ''),
    "Max": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "MaxPool": (('FP32', 'FP16', 'BF16'),
             '2D or 3D pooling only. Indices output tensor unsupported. dilations must be empty or all ones'),
    "Mean": (('FP32', 'FP16', 'BF16', 'FP8', 'INT32', 'INT64'), ''),
    "MeanVarianceNormalization": (('FP32', 'FP16', 'BF16'), ''),
    "Min": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Mish": (('FP32', 'FP16'), ''),
    "Mod": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Mul": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Neg": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "NonMaxSuppression": (('FP32', 'FP16'), ''),
    "NonZero": (('FP32', 'FP16'), ''),
    "Not": (('BOOL',), ''),
    "OneHot": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), 'depth must be a build-time constant'),
    "Or": (('BOOL',), ''),
    "Pad": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), 'axes must be an initializer'),
    "ParametricSoftplus": (('FP32', 'FP16', 'BF16'), ''),
    "Pow": (('FP32', 'FP16', 'BF16'), ''),
    "PRelu": (('FP32', 'FP16', 'BF16'), ''),
    "QuantizeLinear": (('FP32', 'FP16', 'BF16'), 'y_zero_point must be 0'),
    "RandomNormal": (('FP32', 'FP16', 'BF16'), 'seed value is ignored by TensorRT'),
    "RandomNormalLike": (('FP32', 'FP16', 'BF16'), 'seed value is ignored by TensorRT'),
    "RandomUniform": (('FP32', 'FP16', 'BF16'), 'seed value is ignored by TensorRT'),
    "RandomUniformLike": (('FP32', 'FP16', 'BF16'), 'seed value is ignored by TensorRT'),
    "Range": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Reciprocal": (('FP32', 'FP16', 'BF16'), ''),
    "ReduceL1": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), 'axes must be an initializer'),
    "ReduceL2": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), 'axes must be an initializer'),
    "ReduceLogSum": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), 'axes must be an initializer'),
    "ReduceLogSumExp": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), 'axes must be an initializer'),
    "ReduceMax": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), 'axes must be an initializer'),
    "ReduceMean": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), 'axes must be an initializer'),
    "ReduceMin": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), 'axes must be an initializer'),
    "ReduceProd": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), 'axes must be an initializer'),
    "ReduceSum": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), 'axes must be an initializer'),
    "ReduceSumSquare": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), 'axes must be an initializer'),
    "Relu": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Reshape": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "Resize": (('FP32', 'FP16', 'BF16'),
             'Supported resize transformation modes: half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, '
             'asymmetric, and align_corners.; Supported resize modes: nearest, linear.; Supported nearest '
             'modes: floor, ceil, round_prefer_floor, round_prefer_ceil.; Supported aspect ratio policy: '
             'stretch.; When scales is a tensor input, axes must be an iota vector of length rank(input).; '
             'Antialiasing is not supported.'),
    "ReverseSequence": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "RNN": (('FP32', 'FP16', 'BF16'),
             'For bidirectional RNNs, activation functions must be the same for both the forward and reverse '
             'pass'),
    "RoiAlign": (('FP32', 'FP16'), ''),
    "Round": (('FP32', 'FP16', 'BF16'), ''),
    "ScaledTanh": (('FP32', 'FP16', 'BF16'), ''),
    "Scan": (('FP32', 'FP16', 'BF16'), ''),
    "Scatter": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "ScatterElements": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "ScatterND": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), 'reduction is not supported'),
    "Selu": (('FP32', 'FP16', 'BF16', ''), ''),
    "Shape": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "Shrink": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Sigmoid": (('FP32', 'FP16', 'BF16'), ''),
    "Sign": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Sin": (('FP32', 'FP16', 'BF16'), ''),
    "Sinh": (('FP32', 'FP16', 'BF16'), ''),
    "Size": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "Slice": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), 'axes must be an initializer'),
    "Softmax": (('FP32', 'FP16', 'BF16'), ''),
    "Softplus": (('FP32', 'FP16', 'BF16'), ''),
    "Softsign": (('FP32', 'FP16', 'BF16'), ''),
    "SpaceToDepth": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Split": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "Sqrt": (('FP32', 'FP16', 'BF16'), ''),
    "Squeeze": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), 'axes must be an initializer'),
    "Sub": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Sum": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), ''),
    "Tan": (('FP32', 'FP16', 'BF16'), ''),
    "Tanh": (('FP32', 'FP16', 'BF16'), ''),
    "ThresholdedRelu": (('FP32', 'FP16', 'BF16'), ''),
    "Tile": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "TopK": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), 'sorted must be 1. K input must be less than 3840.'),
    "Transpose": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "Trilu": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "Unsqueeze": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), 'axes must be a constant tensor'),
    "Upsample": (('FP32', 'FP16', 'BF16'), ''),
    "Where": (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'), ''),
    "Xor": (('BOOL',), ''),
}

UNSUPPORTED = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Col2Im CenterCropPad
Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear HammingWindow HannWindow ImageDecoder
MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional
OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch STFT SequenceAt
SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap
SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
""".split())
SUPPORTED_OPS = frozenset(SUPPORTED)



def unsupported_ops(op_types: set[str]) -> list[str]:
    """Operators of the default ONNX domain that the TensorRT 10.3 parser would reject, sorted."""
    return sorted(op for op in op_types if op not in SUPPORTED)


def restriction(op_type: str) -> str:
    """The parser table's restriction for ``op_type`` ("" if none)."""
    return SUPPORTED.get(op_type, ((), ""))[1]
