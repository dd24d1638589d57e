// test_header.c as C++: sals.h's extern "C" block and its declarations in a C++ compiler.
#include "test_header.c"
