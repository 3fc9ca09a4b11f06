// A RevBlock on its own: the formula, its inverse, cloning, options.

#include "test_util.h"

#include <sstream>

using namespace torchrev::testing;

TEST(RevBlock, ForwardComputesTheAdditiveCouplingWithPlainAutograd) {
  torch::manual_seed(30);
  torch::nn::Sequential f(torch::nn::Linear(3, 3), torch::nn::Tanh());
  torch::nn::Sequential g(torch::nn::Linear(3, 3), torch::nn::Sigmoid());
  SeqBlock block(f, g);
  block->to(torch::kFloat64);
  auto x = torch::randn({5, 6}, torch::kFloat64);
  auto x1 = x.narrow(1, 0, 3);
  auto x2 = x.narrow(1, 3, 3);
  auto y1 = x1 + f->forward(x2);
  auto y2 = x2 + g->forward(y1);
  auto y = block(x);
  EXPECT_CLOSE(y, torch::cat({y1, y2}, 1), 1e-12);
  EXPECT_TRUE(y.grad_fn() != nullptr); // plain autograd: a graph is recorded
  EXPECT_CLOSE(block->inverse(y), x, 1e-12);
}

TEST(RevBlock, SplitDimOptionSplitsAnotherDimension) {
  torch::manual_seed(31);
  SeqBlock block(
      torch::nn::Sequential(torch::nn::Linear(4, 4)),
      torch::nn::Sequential(torch::nn::Linear(4, 4)),
      torchrev::RevBlockOptions().split_dim(-2));
  block->to(torch::kFloat64);
  auto x = torch::randn({3, 6, 4}, torch::kFloat64);
  auto y1 = x.narrow(1, 0, 3) + block->f->forward(x.narrow(1, 3, 3));
  auto y2 = x.narrow(1, 3, 3) + block->g->forward(y1);
  EXPECT_CLOSE(block(x), torch::cat({y1, y2}, 1), 1e-12);
  std::ostringstream out;
  out << *block;
  EXPECT_NE(
      out.str().find("torchrev::RevBlock(split_dim=-2)"), std::string::npos)
      << out.str();
}

TEST(RevBlock, CloneCopiesFAndGDeeply) {
  torch::manual_seed(32);
  SeqBlock block(
      torch::nn::Sequential(torch::nn::Linear(2, 2)),
      torch::nn::Sequential(torch::nn::Linear(2, 2)));
  auto copy = std::dynamic_pointer_cast<SeqBlock::Impl>(block->clone());
  ASSERT_NE(copy, nullptr);
  auto x = torch::randn({2, 4});
  EXPECT_TRUE(copy->forward(x).equal(block(x)));
  EXPECT_NE(copy->f.ptr(), block->f.ptr());
  EXPECT_NE(
      copy->parameters()[0].data_ptr(), block->parameters()[0].data_ptr());
}

TEST(RevBlock, ErrorsOnABlockOnItsOwnNameTheBlock) {
  SeqBlock block(
      torch::nn::Sequential(torch::nn::Linear(2, 2)),
      torch::nn::Sequential(torch::nn::Linear(2, 2)));
  EXPECT_ERROR_CONTAINS(
      block(torch::randn({2, 3})), "torchrev::RevBlock", "got size 3");
}
