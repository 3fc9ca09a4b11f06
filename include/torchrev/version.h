#pragma once

/// torchrev's version. CMake parses these three lines; keep them here only.
#define TORCHREV_VERSION_MAJOR 0
#define TORCHREV_VERSION_MINOR 1
#define TORCHREV_VERSION_PATCH 0

#define TORCHREV_VERSION_STRING "0.1.0"
