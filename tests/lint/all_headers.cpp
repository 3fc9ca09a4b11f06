// The translation unit clang-tidy checks (the Lint.ClangTidy test): every
// public header of the library and every header of the training example.
// It is compiled only by clang-tidy, never into a binary.
#include <torchrev/torchrev.h>

#include "config.h"
#include "data.h"
#include "distributed.h"
#include "files.h"
#include "formats.h"
#include "progress.h"
#include "trainer.h"
