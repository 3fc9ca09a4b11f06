// The translation unit clang-tidy checks (the Lint.ClangTidy test): every
// public header of the library and every header of the training example.
// It is compiled only by clang-tidy, never into a binary.
#include <torchrev/torchrev.h>

#include "config.h"
#include "data.h"
#include "distributed.h"
#include "distributed/communicator.h"
#include "distributed/compat.h"
#include "distributed/data_parallel.h"
#include "distributed/gradient_reducer.h"
#include "distributed/messages.h"
#include "distributed/model_check.h"
#include "distributed/options.h"
#include "distributed/rendezvous.h"
#include "distributed/sampler.h"
#include "files.h"
#include "formats.h"
#include "metrics.h"
#include "peak_memory.h"
#include "progress.h"
#include "settings.h"
#include "trainer.h"
#include "training_state.h"
#include "validation.h"
