/* Outside the project directory: recc uploads it as ../shared/include/banner.h
 * and runs the compile in the project's subdirectory of the input root. */
#ifndef BANNER_H
#define BANNER_H
#define BANNER "kiln+recc"
#define BANNER_SEED 17u
#endif
