// A tiny project that uses torchrev: installed (find_package), from a build
// tree, through add_subdirectory or through FetchContent.
#include <torchrev/torchrev.h>

#include <iostream>

int main() {
  torchrev::RevSequential stage(
      torchrev::RevBlock<torch::nn::Sequential, torch::nn::Sequential>(
          torch::nn::Sequential(torch::nn::Linear(2, 2)),
          torch::nn::Sequential(torch::nn::Linear(2, 2))));
  auto x = torch::randn({3, 4}, torch::requires_grad());
  stage(x).sum().backward();
  const bool ok = x.grad().defined() && stage->size() == 1;
  std::cout << "torchrev " << TORCHREV_VERSION_STRING
            << (ok ? " works" : " is broken") << std::endl;
  return ok ? 0 : 1;
}
