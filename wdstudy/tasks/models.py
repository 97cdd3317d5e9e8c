"""Backbones: MLP, CNN (1-D for sequences, 2-D for images), RNN (GRU, LSTM), logistic regression
and linear regression.

Each takes the shape of one input example and returns class logits (linear regression: one
real number per example). Sizes are plain integers so that a study spec can override them.
"""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten, then ``layers`` x (Linear, ReLU, Dropout), then a linear classifier."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 256, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        n_in = 1
        for d in input_shape:
            n_in *= d
        blocks: list[nn.Module] = [nn.Flatten()]
        for _ in range(layers):
            blocks += [nn.Linear(n_in, width), nn.ReLU()]
            if dropout:
                blocks.append(nn.Dropout(dropout))
            n_in = width
        blocks.append(nn.Linear(n_in, num_classes))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN(nn.Module):
    """``layers`` x (Conv, [BatchNorm], ReLU) with stride-2 downsampling, then a linear head.

    Sequences of shape ``(L,)`` or ``(C, L)`` use 1-D convolutions; images of shape
    ``(C, H, W)`` use 2-D ones. Channels double every layer from ``width``.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        width: int = 32,
        layers: int = 3,
        kernel_size: int = 5,
        batch_norm: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.add_channel = len(input_shape) == 1
        shape = (1, *input_shape) if self.add_channel else tuple(input_shape)
        two_d = len(shape) == 3
        conv = nn.Conv2d if two_d else nn.Conv1d
        norm = nn.BatchNorm2d if two_d else nn.BatchNorm1d
        c_in, spatial = shape[0], list(shape[1:])
        blocks: list[nn.Module] = []
        for i in range(layers):
            c_out = width * 2**i if two_d else width
            blocks.append(conv(c_in, c_out, kernel_size, stride=2, padding=kernel_size // 2, bias=not batch_norm))
            if batch_norm:
                blocks.append(norm(c_out))
            blocks.append(nn.ReLU())
            spatial = [(s + 2 * (kernel_size // 2) - kernel_size) // 2 + 1 for s in spatial]
            c_in = c_out
        n_flat = c_in
        for s in spatial:
            n_flat *= s
        blocks.append(nn.Flatten())
        if dropout:
            blocks.append(nn.Dropout(dropout))
        blocks.append(nn.Linear(n_flat, num_classes))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.unsqueeze(1) if self.add_channel else x)


class RNN(nn.Module):
    """A GRU or LSTM over the sequence; the last hidden state feeds a linear classifier.

    A sequence of shape ``(L,)`` is read ``chunk`` consecutive values per step (``L / chunk``
    steps); an image ``(C, H, W)`` one row (all channels) per step.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        cell: str = "gru",
        width: int = 64,
        layers: int = 1,
        dropout: float = 0.0,
        chunk: int = 1,
    ):
        super().__init__()
        self.one_d = len(input_shape) == 1
        if self.one_d and input_shape[0] % chunk:
            raise ValueError(f"chunk {chunk} does not divide the sequence length {input_shape[0]}")
        self.chunk = chunk
        n_features = chunk if self.one_d else input_shape[0] * input_shape[-1]
        rnn_cls = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = rnn_cls(n_features, width, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.one_d:
            seq = x.reshape(x.shape[0], -1, self.chunk)
        else:  # (N, C, H, W) -> (N, H, C*W)
            seq = x.permute(0, 2, 1, 3).flatten(2)
        out, _ = self.rnn(seq)
        return self.head(out[:, -1])


class LinearRegression(nn.Module):
    """``w·x + b``: one ``nn.Linear(features, 1)`` on fixed features, one number per example.

    The weights ``w`` are what the regularizers act on; the bias ``b`` is not regularized,
    unless ``decay_all`` (as for every bias: :func:`wdstudy.regularizers.split_parameters`).
    """

    def __init__(self, input_shape: tuple[int, ...]):
        super().__init__()
        n_in = 1
        for d in input_shape:
            n_in *= d
        self.linear = nn.Linear(n_in, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1)).squeeze(-1)


def build_model(model: str, input_shape: tuple[int, ...], num_classes: int, **sizes) -> nn.Module:
    """Build backbone ``model`` ('mlp', 'cnn', 'gru', 'lstm', 'logreg', 'linreg') with the given sizes
    (``num_classes`` is ignored by ``linreg``, which predicts one number)."""
    if model == "linreg":
        return LinearRegression(input_shape)
    if model == "logreg":  # multinomial logistic regression: flatten, one linear layer, softmax in the loss
        return MLP(input_shape, num_classes, layers=0)
    if model == "mlp":
        return MLP(input_shape, num_classes, **sizes)
    if model == "cnn":
        return CNN(input_shape, num_classes, **sizes)
    return RNN(input_shape, num_classes, cell=model, **sizes)
