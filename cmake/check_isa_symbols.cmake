# Fails the build when an object compiled with wider-ISA flags (-mavx2, -mavx512f ...) defines a weak symbol
# outside its ISA namespace (ne::isa_avx2::, ne::isa_avx512:: ...).
#
# Why: inline functions and template member functions (std::vector<float>::_M_fill_assign ...) are emitted as
# weak symbols in every object that uses them, and the linker keeps one copy per name for the whole library.
# If the copy it keeps is one compiled with AVX-512 flags, generic code (the runner) calling it dies of SIGILL
# on a CPU without AVX-512. Names inside the ISA namespace (and containers with its allocator type: core/aligned.h
# Vec / AlignedVec) are the ISA's own and cannot be shared. DW.ref.* (exception-personality references) hold
# no code.
#
# Usage: cmake -DNM=<nm> -DOBJECTS=<a.o;b.o;...> -DSTAMP=<file> -P check_isa_symbols.cmake
set(bad "")
foreach(obj IN LISTS OBJECTS)
  execute_process(COMMAND ${NM} --defined-only -C ${obj} OUTPUT_VARIABLE out RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "check_isa_symbols: ${NM} failed on ${obj}")
  endif()
  string(REPLACE "\n" ";" lines "${out}")
  foreach(line IN LISTS lines)
    # weak (W / w), weak object (V / v) and unique (u) symbols
    if(line MATCHES "^[0-9a-fA-F]* [WwVvu] (.*)$")
      set(sym "${CMAKE_MATCH_1}")
      if(NOT sym MATCHES "ne::isa_[a-z0-9]+::" AND NOT sym MATCHES "^DW\\.ref\\.")
        get_filename_component(name ${obj} NAME)
        list(APPEND bad "${name}: ${sym}")
      endif()
    endif()
  endforeach()
endforeach()
if(bad)
  list(REMOVE_DUPLICATES bad)
  string(REPLACE ";" "\n  " shown "${bad}")
  message(FATAL_ERROR "check_isa_symbols: wider-ISA objects define weak symbols another object may share (the "
                      "linker could keep their copy, which then runs on CPUs without that ISA):\n  ${shown}\n"
                      "Use ne::NE_ISA_NS::Vec / AlignedVec (core/aligned.h) for containers in kernel files, and "
                      "keep inline helpers inside NE_ISA_NS.")
endif()
file(WRITE ${STAMP} "ok\n")
