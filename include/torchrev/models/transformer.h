#pragma once

// Vision transformers: a plain pre-norm ViT (Dosovitskiy et al. 2021) and a
// reversible one (RevViT, Mangalam et al. 2022) built from the same F and G.
//
// A transformer block has two residual functions on tokens of `dim`
// features:
//
//     F = LayerNorm -> multi-head self-attention (-> dropout)
//     G = LayerNorm -> Linear -> GELU -> dropout -> Linear (-> dropout)
//
// The plain block computes x = x + F(x), x = x + G(x). The reversible block
// runs on a token stream of 2 * dim features, split along the feature
// dimension into halves (x1, x2) of dim each: y1 = x1 + F(x2), y2 = x2 +
// G(y1). RevViT feeds both halves the patch embedding and averages them
// before the head, so that ViT and RevViT of the same options have the same
// parameters and the same F and G (the blocks combine them differently).

#include <torchrev/models/nets.h>
#include <torchrev/rev_block.h>
#include <torchrev/rev_sequential.h>

#include <torch/arg.h>
#include <torch/nn.h>
#include <torch/types.h>
#include <torch/version.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <ostream>
#include <utility>

namespace torchrev {
namespace models {

/// Options of a transformer block.
struct TransformerBlockOptions {
  TransformerBlockOptions(int64_t dim, int64_t heads)
      : dim_(dim), heads_(heads) {}
  /// Features per token that F and G read and write.
  TORCH_ARG(int64_t, dim);
  /// Attention heads; `dim` must be divisible by them.
  TORCH_ARG(int64_t, heads);
  /// Width of the MLP's hidden layer, in multiples of `dim`.
  TORCH_ARG(int64_t, mlp_ratio) = 4;
  /// Dropout on the outputs of the attention and of both MLP layers.
  TORCH_ARG(double, dropout) = 0.0;
  /// Dropout on the attention weights.
  TORCH_ARG(double, attention_dropout) = 0.0;
};

namespace detail {

inline void check_transformer_options(
    const TransformerBlockOptions& options,
    const char* what) {
  TORCH_CHECK(
      options.dim() >= 1 && options.heads() >= 1 &&
          options.dim() % options.heads() == 0,
      what,
      ": expected dim divisible by heads (both positive), got dim ",
      options.dim(),
      " and ",
      options.heads(),
      " heads");
  TORCH_CHECK(
      options.mlp_ratio() >= 1,
      what,
      ": expected mlp_ratio >= 1, got ",
      options.mlp_ratio());
  for (double p : {options.dropout(), options.attention_dropout()}) {
    TORCH_CHECK(
        p >= 0.0 && p < 1.0,
        what,
        ": expected dropout probabilities in [0, 1), got ",
        p);
  }
}

inline void check_tokens(
    const torch::Tensor& x,
    int64_t dim,
    const char* what) {
  TORCH_CHECK(
      x.dim() == 3 && x.size(2) == dim,
      what,
      ": expected tokens of shape (batch, tokens, ",
      dim,
      "), got shape ",
      x.sizes());
}

} // namespace detail

/// F of a transformer block: LayerNorm, then multi-head self-attention over
/// the tokens of a (batch, tokens, dim) input, then dropout. On LibTorch 2.x
/// without attention dropout the attention is `scaled_dot_product_attention`
/// (a fused kernel where one applies); otherwise softmax(q k^T / sqrt(d)) v
/// with dropout on the weights, spelled out: a fused kernel chosen by
/// whether gradients are needed could draw other dropout masks in the
/// backward's recompute than in the grad-less forward of a reversible
/// stage.
class SelfAttentionResidualImpl
    : public torch::nn::Cloneable<SelfAttentionResidualImpl> {
 public:
  explicit SelfAttentionResidualImpl(TransformerBlockOptions options_)
      : options(std::move(options_)) {
    detail::check_transformer_options(
        options, "torchrev::models::SelfAttentionResidual");
    reset();
  }

  void reset() override {
    const int64_t dim = options.dim();
    norm = register_module(
        "norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})));
    qkv = register_module("qkv", torch::nn::Linear(dim, 3 * dim));
    proj = register_module("proj", torch::nn::Linear(dim, dim));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    detail::check_tokens(
        x, options.dim(), "torchrev::models::SelfAttentionResidual");
    const int64_t batch = x.size(0), tokens = x.size(1);
    const int64_t heads = options.heads(), head_dim = options.dim() / heads;
    // (batch, tokens, 3, heads, head_dim) -> 3 x (batch, heads, tokens, d).
    auto qkv_heads = qkv(norm(x))
                         .view({batch, tokens, 3, heads, head_dim})
                         .permute({2, 0, 3, 1, 4});
    auto q = qkv_heads[0], k = qkv_heads[1], v = qkv_heads[2];
    const double p = is_training() ? options.attention_dropout() : 0.0;
    torch::Tensor attended;
#if TORCH_VERSION_MAJOR >= 2
    if (p == 0.0) {
      attended = at::scaled_dot_product_attention(q, k, v);
    }
#endif
    if (!attended.defined()) {
      auto weights = torch::softmax(
          torch::matmul(q, k.transpose(-2, -1)) /
              std::sqrt(static_cast<double>(head_dim)),
          -1);
      attended = torch::matmul(torch::dropout(weights, p, p > 0.0), v);
    }
    auto merged =
        attended.transpose(1, 2).reshape({batch, tokens, options.dim()});
    return torch::dropout(
        proj(merged),
        options.dropout(),
        is_training() && options.dropout() > 0);
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::models::SelfAttentionResidual(dim=" << options.dim()
           << ", heads=" << options.heads() << ")";
  }

  TransformerBlockOptions options;
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear qkv{nullptr}, proj{nullptr};
};
TORCH_MODULE(SelfAttentionResidual);

/// G of a transformer block: LayerNorm, Linear to mlp_ratio * dim, GELU,
/// dropout, Linear back to dim, dropout.
class MlpResidualImpl : public torch::nn::Cloneable<MlpResidualImpl> {
 public:
  explicit MlpResidualImpl(TransformerBlockOptions options_)
      : options(std::move(options_)) {
    detail::check_transformer_options(options, "torchrev::models::MlpResidual");
    reset();
  }

  void reset() override {
    const int64_t dim = options.dim(), hidden = dim * options.mlp_ratio();
    norm = register_module(
        "norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})));
    fc1 = register_module("fc1", torch::nn::Linear(dim, hidden));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, dim));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    detail::check_tokens(x, options.dim(), "torchrev::models::MlpResidual");
    const double p = options.dropout();
    const bool drop = is_training() && p > 0.0;
    auto h = torch::dropout(torch::gelu(fc1(norm(x))), p, drop);
    return torch::dropout(fc2(h), p, drop);
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::models::MlpResidual(dim=" << options.dim()
           << ", hidden=" << options.dim() * options.mlp_ratio() << ")";
  }

  TransformerBlockOptions options;
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(MlpResidual);

/// A plain pre-norm transformer block on (batch, tokens, dim) tokens:
/// x = x + F(x), then x = x + G(x).
class TransformerBlockImpl : public torch::nn::Cloneable<TransformerBlockImpl> {
 public:
  explicit TransformerBlockImpl(TransformerBlockOptions options_)
      : options(std::move(options_)) {
    reset();
  }

  void reset() override {
    f = register_module("f", SelfAttentionResidual(options));
    g = register_module("g", MlpResidual(options));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    auto h = x + f(x);
    return h + g(h);
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::models::TransformerBlock";
  }

  TransformerBlockOptions options;
  SelfAttentionResidual f{nullptr};
  MlpResidual g{nullptr};
};
TORCH_MODULE(TransformerBlock);

/// A reversible transformer block: its input is (batch, tokens, 2 * dim),
/// split along the features into halves of `dim`; F attends, G is the MLP.
using RevTransformerBlock = RevBlock<SelfAttentionResidual, MlpResidual>;

/// Builds a `RevTransformerBlock` (split along the last dimension).
inline RevTransformerBlock rev_transformer_block(
    const TransformerBlockOptions& options) {
  return RevTransformerBlock(
      SelfAttentionResidual(options),
      MlpResidual(options),
      RevBlockOptions().split_dim(-1));
}

/// How a vision transformer turns its tokens into one vector per image.
enum class TokenPooling {
  /// The mean over the patch tokens.
  kMean,
  /// A learned class token, prepended to the patch tokens.
  kClassToken,
};

/// Options of `ViT` and `RevViT`. Defaults: `vit_mini` / `revvit_mini` for
/// 32x32 images.
struct ViTOptions {
  /// Height and width of the input images.
  TORCH_ARG(int64_t, image_size) = 32;
  /// Height and width of a patch (one token); divides `image_size`.
  TORCH_ARG(int64_t, patch_size) = 4;
  /// Image channels: 3 for CIFAR, 1 for Fashion-MNIST.
  TORCH_ARG(int64_t, in_channels) = 3;
  /// Number of classes.
  TORCH_ARG(int64_t, num_classes) = 10;
  /// Features per token of F and G (RevViT's stream carries twice this).
  TORCH_ARG(int64_t, dim) = 64;
  /// Transformer blocks.
  TORCH_ARG(int64_t, depth) = 6;
  /// Attention heads.
  TORCH_ARG(int64_t, heads) = 4;
  /// Width of the MLP's hidden layer, in multiples of `dim`.
  TORCH_ARG(int64_t, mlp_ratio) = 2;
  /// Dropout on the attention and MLP outputs.
  TORCH_ARG(double, dropout) = 0.0;
  /// Dropout on the attention weights.
  TORCH_ARG(double, attention_dropout) = 0.0;
  /// Mean pooling or a class token.
  TORCH_ARG(TokenPooling, pool) = TokenPooling::kMean;
  /// For RevViT: how the blocks run (to compare memory and time on the same
  /// blocks).
  TORCH_ARG(StageMode, mode) = StageMode::kReversible;

 public:
  /// The options of each block.
  TransformerBlockOptions block() const {
    return TransformerBlockOptions(dim(), heads())
        .mlp_ratio(mlp_ratio())
        .dropout(dropout())
        .attention_dropout(attention_dropout());
  }
};

namespace detail {

/// Patch embedding (a strided convolution), position embedding and, with
/// class-token pooling, the class token: images in, (batch, tokens, dim)
/// out.
class PatchEmbeddingImpl : public torch::nn::Cloneable<PatchEmbeddingImpl> {
 public:
  explicit PatchEmbeddingImpl(ViTOptions options_)
      : options(std::move(options_)) {
    reset();
  }

  void reset() override {
    const int64_t grid = options.image_size() / options.patch_size();
    const int64_t tokens =
        grid * grid + (options.pool() == TokenPooling::kClassToken ? 1 : 0);
    patches = register_module(
        "patches",
        torch::nn::Conv2d(
            torch::nn::Conv2dOptions(
                options.in_channels(), options.dim(), options.patch_size())
                .stride(options.patch_size())));
    position = register_parameter(
        "position", torch::randn({1, tokens, options.dim()}) * 0.02);
    if (options.pool() == TokenPooling::kClassToken) {
      class_token = register_parameter(
          "class_token", torch::zeros({1, 1, options.dim()}));
    }
  }

  torch::Tensor forward(const torch::Tensor& images) {
    TORCH_CHECK(
        images.dim() == 4 && images.size(1) == options.in_channels() &&
            images.size(2) == options.image_size() &&
            images.size(3) == options.image_size(),
        "torchrev::models::ViT: expected images of shape (batch, ",
        options.in_channels(),
        ", ",
        options.image_size(),
        ", ",
        options.image_size(),
        "), got shape ",
        images.sizes());
    auto tokens = patches(images).flatten(2).transpose(1, 2);
    if (class_token.defined()) {
      tokens = torch::cat(
          {class_token.expand({tokens.size(0), 1, options.dim()}), tokens}, 1);
    }
    return tokens + position;
  }

  ViTOptions options;
  torch::nn::Conv2d patches{nullptr};
  torch::Tensor position, class_token;
};
TORCH_MODULE(PatchEmbedding);

inline void check_vit_options(const ViTOptions& options, const char* what) {
  TORCH_CHECK(
      options.patch_size() >= 1 && options.image_size() >= 1 &&
          options.image_size() % options.patch_size() == 0,
      what,
      ": expected a patch_size that divides image_size, got patch_size ",
      options.patch_size(),
      " and image_size ",
      options.image_size());
  TORCH_CHECK(
      options.depth() >= 1 && options.in_channels() >= 1 &&
          options.num_classes() >= 1,
      what,
      ": depth, in_channels and num_classes must be positive");
  check_transformer_options(options.block(), what);
}

/// LayerNorm, pooling over the tokens and the classifier.
class TokenHeadImpl : public torch::nn::Cloneable<TokenHeadImpl> {
 public:
  explicit TokenHeadImpl(ViTOptions options_) : options(std::move(options_)) {
    reset();
  }

  void reset() override {
    norm = register_module(
        "norm",
        torch::nn::LayerNorm(torch::nn::LayerNormOptions({options.dim()})));
    fc = register_module(
        "fc", torch::nn::Linear(options.dim(), options.num_classes()));
  }

  torch::Tensor forward(const torch::Tensor& tokens) {
    auto x = norm(tokens);
    x = options.pool() == TokenPooling::kClassToken ? x.select(1, 0)
                                                    : x.mean(1);
    return fc(x);
  }

  ViTOptions options;
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(TokenHead);

} // namespace detail

/// A plain vision transformer: patch embedding, `depth` pre-norm
/// transformer blocks with every activation stored, LayerNorm, pooling and a
/// linear classifier.
///
/// ```
/// torchrev::models::ViT vit(torchrev::models::ViTOptions()
///                               .image_size(28)
///                               .in_channels(1)
///                               .depth(12));
/// ```
class ViTImpl : public detail::CloneableClassifier<ViTImpl> {
 public:
  explicit ViTImpl(ViTOptions options_ = {}) : options(std::move(options_)) {
    detail::check_vit_options(options, "torchrev::models::ViT");
    reset();
  }

  void reset() override {
    embedding = register_module("embedding", detail::PatchEmbedding(options));
    blocks = register_module("blocks", torch::nn::Sequential());
    for (int64_t i = 0; i < options.depth(); ++i) {
      blocks->push_back(TransformerBlock(options.block()));
    }
    head = register_module("head", detail::TokenHead(options));
  }

  torch::Tensor forward(const torch::Tensor& images) override {
    return head(blocks->forward(embedding(images)));
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::models::ViT";
  }

  ViTOptions options;
  detail::PatchEmbedding embedding{nullptr};
  torch::nn::Sequential blocks{nullptr};
  detail::TokenHead head{nullptr};
};
TORCH_MODULE(ViT);

/// A reversible vision transformer (RevViT): the ViT of the same options with
/// its blocks in one `RevSequential`, so that training keeps the token stream
/// of the stage's output only, whatever the depth. Both halves of the stream
/// start as the patch embedding; the head sees their mean. Parameters: the
/// same as `ViT`'s.
class RevViTImpl : public detail::CloneableClassifier<RevViTImpl> {
 public:
  explicit RevViTImpl(ViTOptions options_ = {}) : options(std::move(options_)) {
    detail::check_vit_options(options, "torchrev::models::RevViT");
    reset();
  }

  void reset() override {
    embedding = register_module("embedding", detail::PatchEmbedding(options));
    blocks = register_module("blocks", RevSequential());
    for (int64_t i = 0; i < options.depth(); ++i) {
      blocks->push_back(rev_transformer_block(options.block()));
    }
    head = register_module("head", detail::TokenHead(options));
  }

  torch::Tensor forward(const torch::Tensor& images) override {
    auto tokens = embedding(images);
    auto stream =
        run_stage(*blocks, torch::cat({tokens, tokens}, -1), options.mode());
    auto halves = stream.chunk(2, -1);
    return head((halves[0] + halves[1]) * 0.5);
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchrev::models::RevViT";
  }

  ViTOptions options;
  detail::PatchEmbedding embedding{nullptr};
  /// The reversible blocks, on a stream of 2 * dim features per token.
  RevSequential blocks{nullptr};
  detail::TokenHead head{nullptr};
};
TORCH_MODULE(RevViT);

} // namespace models
} // namespace torchrev
