/* The public header on its own, first and alone, compiled as strict C99 (and, through
 * test_header.cpp, as C++11) with every warning an error: what the C ABI promises its users.
 * Run, it checks that the header and the library it links agree. */
#include <sals/sals.h>

#include <stdio.h>
#include <string.h>

int main(void) {
  const int ok =
      sals_abi_version() == SALS_ABI_VERSION && strcmp(sals_version(), SALS_VERSION_STRING) == 0;
  printf("%d passed, %d failed\n", ok, !ok);
  return !ok;
}
